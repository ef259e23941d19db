"""A worker SIGKILLed mid-stream: the replacement's recovery lists the journaled segments
in the manifest, and the HLS playlist beside it names them too."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import m3u8
import pytest

from tests.faults.conftest import ServiceProcesses
from tests.faults.test_faults import wait_for_manifest
from tests.faults.test_workers import FPS, bots_on


async def test_recovery_after_a_kill_rewrites_the_playlist_with_the_recovered_segments(
    services: ServiceProcesses,
) -> None:
    service = await services.start(workers=1, segment_target_s=1)
    (pid,) = await service.wait_for_workers(1)
    async with bots_on(service, 1) as held:
        (bot,) = held.values()
        began = time.monotonic()
        # Past a few cut segments, and into an open one that only the journal holds.
        while bot.sent < int(3.5 * FPS):
            await bot.send_next()
            await asyncio.sleep(max(0, began + bot.sent / FPS - time.monotonic()))
        os.kill(pid, signal.SIGKILL)
    await service.wait_for_workers(1)

    manifest = await wait_for_manifest(services, bot.manifest_key, "interrupted")
    recovered = [s for s in manifest["segments"] if s.get("recovered")]
    assert recovered, "nothing was left for recovery to list"
    playlist_key = bot.manifest_key.removesuffix("manifest.json") + "playlist.m3u8"
    raw = await services.store.get(playlist_key)
    assert raw is not None
    playlist = m3u8.loads(raw.decode())
    folder = manifest["segments"][0]["init_key"].rpartition("/")[0] + "/"
    assert [folder + s.uri for s in playlist.segments] == [s["key"] for s in manifest["segments"]]
    assert [s.duration for s in playlist.segments] == pytest.approx(
        [s["end"] - s["start"] for s in manifest["segments"]]
    )
    assert {folder + s.init_section.uri for s in playlist.segments} == {
        s["init_key"] for s in manifest["segments"]
    }
