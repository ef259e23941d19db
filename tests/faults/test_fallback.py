"""An S3 outage that outlives the task: liveness apart from admission, the fallback store,
reconciling it into the primary, and a spool that cannot be written."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from archiver.consumers.decode_check import check_stream
from archiver.store import LocalFolderStore
from archiver.tools.simulator import Simulation, run_simulation
from tests.faults.conftest import RestartableS3, ServiceProcess, ServiceProcesses


def manifest_key(sim: Simulation, participant_id: int) -> str:
    return (
        f"{sim.bot_id}/{sim.recording_id}/participants/{participant_id}/webcam/h264/manifest.json"
    )


def spooled_files(workdir: Path) -> list[Path]:
    folder = workdir / "spool" / "worker-0" / "objects"
    return sorted(folder.glob("*")) if folder.is_dir() else []


async def wait_until(condition, timeout_s: float = 60, every_s: float = 0.1) -> float:
    """Poll `condition` (a coroutine function) until true; return the seconds it took."""
    started = time.monotonic()
    async with asyncio.timeout(timeout_s):
        while not await condition():  # noqa: ASYNC110 (a condition in another process)
            await asyncio.sleep(every_s)
    return time.monotonic() - started


async def status_of(port: int, path: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status


async def test_sigterm_during_an_outage_sends_the_spool_to_the_fallback_and_loses_nothing(
    services: ServiceProcesses, outage_s3: RestartableS3, tmp_path: Path
) -> None:
    fallback = tmp_path / "fallback"
    service = await services.start(
        segment_target_s=1,
        fallback_store=f"file://{fallback}",
        fallback_after_s=1,
        reconcile_interval_s=0.5,
        drain_deadline_s=20,
    )
    sim = Simulation(
        url=service.url,
        participants=2,
        seconds=30,
        fps=15,
        size=(320, 240),
        keyframe_interval_s=1,
        realtime=True,
    )
    sending = asyncio.create_task(run_simulation(sim))

    def frames_sent() -> int:
        return sum(len(stream.sent) for stream in sim.streams)

    async def sent_at_least(count: int) -> bool:
        return frames_sent() >= count

    await wait_until(lambda: sent_at_least(90))  # 3 s into the meeting.
    outage_s3.stop()  # Primary cut early, and left cut.
    await wait_until(lambda: sent_at_least(420))  # 14 s: well past ARCHIVER_FALLBACK_AFTER_S.
    assert await status_of(service.port, "/healthz") == 200
    assert service.process is not None
    service.process.send_signal(15)  # SIGTERM mid-meeting.
    await asyncio.wait_for(sending, 30)
    assert sim.close_code == aiohttp.WSCloseCode.SERVICE_RESTART
    assert await service.stop() == 0
    events = [line["event"] for line in service.logs()]
    assert "fallback_store_in_use" in events
    assert "close_reply_missing" not in events
    # Nothing is left on the task's disk: the fallback confirmed every object.
    assert spooled_files(service.workdir) == []
    assert any(fallback.rglob("*.m4s"))

    outage_s3.start()
    restored = time.monotonic()
    fresh = await services.start(fallback_store=f"file://{fallback}", reconcile_interval_s=0.5)
    store = LocalFolderStore(fallback)

    async def fallback_empty() -> bool:
        return await store.list_keys("") == []

    took = await wait_until(fallback_empty, timeout_s=60)
    print(f"reconciled in {took:.1f} s ({time.monotonic() - restored:.1f} s after S3 returned)")
    sent = 0
    for stream in sim.streams:
        check = await check_stream(
            services.store, manifest_key(sim, stream.participant_id), key_prefix="archive/"
        )
        assert check.ok, check.problems
        times = [round(frame.time_s, 6) for frame in check.frames]
        assert times == [frame.relative_s for frame in stream.sent]
        sent += len(stream.sent)
    print(f"{sent} of {sent} frames sent before the 1012 close archived")
    moved = [line for line in fresh.logs() if line["event"] == "fallback_reconciled"]
    print("reconciled:", [(m["moved_objects"], m["merged_documents"], m["seconds"]) for m in moved])
    assert sent >= 420
    await fresh.stop()


async def test_liveness_stays_up_while_a_full_task_refuses_upgrades(
    services: ServiceProcesses, outage_s3: RestartableS3
) -> None:
    service = await services.start(
        segment_target_s=0.5, spool_cap_bytes=2 * 1024**2, spool_high_water_ratio=0.5
    )
    outage_s3.stop()
    sim = Simulation(
        url=service.url, participants=2, seconds=20, fps=15, size=(640, 360), realtime=False
    )
    sending = asyncio.create_task(run_simulation(sim))
    health: list[int] = []

    async def refused() -> bool:
        health.append(await status_of(service.port, "/healthz"))
        return await service.readyz() == 503

    await wait_until(refused, timeout_s=60, every_s=0.2)
    status, readiness = await service.readiness()
    assert status == 503
    assert any("spool" in reason for reason in readiness["reasons"])
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
            await session.ws_connect(service.url)
    assert refusal.value.status == 503
    for _ in range(5):
        health.append(await status_of(service.port, "/healthz"))
    assert set(health) == {200}
    outage_s3.start()
    await asyncio.wait_for(sending, 60)


async def test_two_services_reconcile_one_fallback_at_once(
    services: ServiceProcesses, tmp_path: Path
) -> None:
    # An archive as a task would leave in the fallback: written by a service whose store
    # is the folder itself.
    fallback = tmp_path / "fallback"
    writer = await services.start(store=f"file://{fallback}/archive")
    sim = Simulation(url=writer.url, participants=2, seconds=6, fps=15, keyframe_interval_s=0.5)
    await run_simulation(sim)
    await writer.stop()
    services.started.remove(writer)
    store = LocalFolderStore(fallback / "archive")
    # The primary already holds part of one stream: its manifest lists the first half of
    # the segments, the fallback's the second half; both halves must end up listed once.
    key = manifest_key(sim, 100)
    document = orjson.loads(await store.get(key) or b"")
    half = len(document["segments"]) // 2
    first = {**document, "segments": document["segments"][:half]}
    rest = {**document, "segments": document["segments"][half:]}
    for segment in first["segments"]:
        plain = segment["key"].removeprefix("archive/")
        await services.store.put(plain, await store.get(plain) or b"", "video/iso.segment")
        await store.delete(plain)
    await services.store.put(key, orjson.dumps(first), "application/json")
    await store.put(key, orjson.dumps(rest), "application/json")

    # Two tasks: a spool folder each (one spool has one service's workers).
    both = [
        await services.start(
            fallback_store=f"file://{fallback}/archive",
            reconcile_interval_s=0.2,
            spool_dir=str(tmp_path / f"spool-{n}"),
        )
        for n in range(2)
    ]

    async def fallback_empty() -> bool:
        return await store.list_keys("") == []

    await wait_until(fallback_empty, timeout_s=60)
    for stream in sim.streams:
        check = await check_stream(
            services.store, manifest_key(sim, stream.participant_id), key_prefix="archive/"
        )
        assert check.ok, check.problems
        keys = [segment["key"] for segment in check.manifest["segments"]]
        assert len(keys) == len(set(keys))
        assert [round(f.time_s, 6) for f in check.frames] == [f.relative_s for f in stream.sent]
        # The participant's multivariant playlist, rebuilt from the merged session index.
        stream_key = manifest_key(sim, stream.participant_id)
        folder = stream_key.removesuffix("/webcam/h264/manifest.json")
        playlist = await services.store.get(f"{folder}/playlist.m3u8")
        assert playlist is not None
        assert playlist.decode().splitlines()[-1] == "webcam/h264/playlist.m3u8"
    moved = [
        line
        for service in both
        for line in service.logs()
        if line["event"] == "fallback_reconciled"
    ]
    assert moved


async def test_archiver_reconcile_from_a_shell_reports_what_it_moved(
    services: ServiceProcesses, tmp_path: Path
) -> None:
    fallback = tmp_path / "fallback"
    store = LocalFolderStore(fallback)
    await store.put("bot/rec/participants/1/webcam/h264/segments/0000000000000.m4s", b"x" * 10, "")
    env = {
        **os.environ,
        "ARCHIVER_STORE": f"s3://{services.bucket}/archive",
        "ARCHIVER_S3_ENDPOINT_URL": services.s3.endpoint,
        "ARCHIVER_FALLBACK_STORE": f"file://{fallback}",
        "ARCHIVER_LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "archiver",
        "reconcile",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert process.returncode == 0
    report = orjson.loads(out.decode().strip().splitlines()[-1])
    assert report["moved_objects"] == 1
    assert report["left"] == []
    assert await store.list_keys("") == []
    assert (
        await services.store.get("bot/rec/participants/1/webcam/h264/segments/0000000000000.m4s")
        == b"x" * 10
    )


async def test_serve_refuses_to_start_with_a_spool_it_cannot_write(
    services: ServiceProcesses, tmp_path: Path
) -> None:
    spool = tmp_path / "not-a-folder"
    spool.write_text("a regular file where the spool folder should be\n")
    process = ServiceProcess(tmp_path, services.s3.endpoint, services.bucket, spool_dir=str(spool))
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "archiver",
        "serve",
        env=process.env,
        cwd=tmp_path,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(child.communicate(), 30)
    assert child.returncode != 0
    message = err.decode()
    assert str(spool) in message
    assert "owned by uid" in message
    assert "mode" in message
    assert f"runs as uid {os.getuid()}" in message
