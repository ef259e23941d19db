"""What is lost when things go wrong: S3 outages, a killed worker, a full spool."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import UTC, datetime

import aiohttp
import orjson

from archiver.consumers.decode_check import check_events, check_stream
from archiver.layout import RecordingId
from archiver.tools.simulator import (
    Simulation,
    encode_stream,
    media_message,
    participant_event,
    run_simulation,
)
from tests.faults.conftest import RestartableS3, ServiceProcess, ServiceProcesses


def manifest_key(sim: Simulation, participant_id: int) -> str:
    return (
        f"{sim.bot_id}/{sim.recording_id}/participants/{participant_id}/webcam/h264/manifest.json"
    )


async def wait_for_manifest(
    services: ServiceProcesses, key: str, status: str, timeout_s: float = 60
) -> dict:
    async with asyncio.timeout(timeout_s):
        while True:
            raw = await services.store.get(key)
            if raw is not None and orjson.loads(raw)["status"] == status:
                return orjson.loads(raw)
            await asyncio.sleep(0.2)


async def wait_for_events(
    services: ServiceProcesses, recording: RecordingId, timeout_s: float = 60
) -> dict:
    async with asyncio.timeout(timeout_s):
        while True:
            raw = await services.store.get(recording.events_manifest_key)
            if raw is not None:
                return orjson.loads(raw)
            await asyncio.sleep(0.2)


async def spool_emptied(service: ServiceProcess, timeout_s: float = 60) -> dict:
    """Objects that failed during an outage retry on their own backoff (up to 30 s apart):
    wait until the last one is through."""
    async with asyncio.timeout(timeout_s):
        while True:
            status, readiness = await service.readiness()
            if status == 200 and readiness["spool_pending_bytes"] == 0:
                return readiness
            await asyncio.sleep(0.5)


async def test_s3_down_for_20_seconds_mid_stream_loses_no_frame(
    services: ServiceProcesses, outage_s3: RestartableS3
) -> None:
    service = await services.start(
        segment_target_s=1, spool_cap_bytes=8 * 1024**2, spool_high_water_ratio=0.05
    )
    sim = Simulation(
        url=service.url,
        participants=2,
        seconds=30,
        fps=15,
        size=(640, 360),
        keyframe_interval_s=1,
        realtime=True,
    )
    sending = asyncio.create_task(run_simulation(sim))
    await asyncio.sleep(5)
    assert await service.readyz() == 200
    outage_s3.stop()
    down_at = time.monotonic()
    statuses = []
    while time.monotonic() - down_at < 20:
        statuses.append(await service.readyz())
        await asyncio.sleep(0.5)
    outage_s3.start()
    await sending
    for stream in sim.streams:
        await wait_for_manifest(services, manifest_key(sim, stream.participant_id), "complete")
    assert 503 in statuses
    readiness = await spool_emptied(service)
    assert readiness["store_reachable"] is True
    assert readiness["upload_retries"] > 0
    for stream in sim.streams:
        check = await check_stream(
            services.store, manifest_key(sim, stream.participant_id), key_prefix="archive/"
        )
        assert check.ok, check.problems
        assert len(check.frames) == len(stream.sent) == 450
    events = [line["event"] for line in service.logs()]
    assert "store_unreachable" in events
    assert "store_reachable_again" in events
    assert "spool_state_changed" in events


async def test_killed_worker_is_replaced_and_its_journal_recovered(
    services: ServiceProcesses,
) -> None:
    service = await services.start(segment_target_s=6)
    sim = Simulation(url=service.url, participants=2, seconds=10, fps=15, keyframe_interval_s=2)
    start = datetime.now(UTC)
    timelines = {
        stream.participant_id: list(encode_stream(stream, sim.seconds, sim.fps, 2.0))
        for stream in sim.plan()
    }
    sent = dict.fromkeys(timelines, 0)
    events = [
        orjson.dumps(participant_event("join", pid, 0.0, start, sim.bot_id, sim.recording_id))
        for pid in timelines
    ]
    async with aiohttp.ClientSession() as session, session.ws_connect(service.url) as ws:
        for event in events:
            await ws.send_str(event.decode())
        began = time.monotonic()
        for index in range(int(4.5 * sim.fps)):
            for pid, units in timelines.items():
                relative, data, _ = units[index]
                message = media_message(
                    data, relative, start, "webcam", pid, sim.bot_id, sim.recording_id
                )
                await ws.send_str(orjson.dumps(message).decode())
                sent[pid] += 1
            await asyncio.sleep(max(0, began + (index + 1) / sim.fps - time.monotonic()))
        killed = service.worker_pid()
        os.kill(killed, signal.SIGKILL)
        closing = await ws.receive()
        assert closing.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR,
        )
    await service.wait_healthy()
    assert service.worker_pid() != killed
    for pid, count in sent.items():
        manifest = await wait_for_manifest(services, manifest_key(sim, pid), "interrupted")
        check = await check_stream(services.store, manifest_key(sim, pid), key_prefix="archive/")
        assert check.ok, check.problems
        archived = len(check.frames)
        lost_s = (count - archived) / sim.fps
        assert 0 <= lost_s <= 2.0, f"participant {pid}: {lost_s:.2f} s lost"
        assert manifest["recovered_ranges"]
        assert any(s["recovered"] for s in manifest["segments"])
        sent_times = [round(u[0], 3) for u in timelines[pid][:archived]]
        assert [round(f.time_s, 3) for f in check.frames] == sent_times
    recovering = [line for line in service.logs() if line["event"] == "recovering"]
    assert recovering
    assert recovering[0]["replayed_segments"] >= 2
    recording = RecordingId(sim.bot_id, sim.recording_id)
    events_manifest = await wait_for_events(services, recording)
    assert events_manifest["status"] == "interrupted"
    check = await check_events(services.store, recording, key_prefix="archive/")
    assert check.ok, check.problems
    assert check.lines == events
    assert all(batch["recovered"] for batch in events_manifest["batches"])


async def test_full_spool_slows_the_sender_without_dropping_and_memory_stays_bounded(
    services: ServiceProcesses, outage_s3: RestartableS3
) -> None:
    service: ServiceProcess = await services.start(
        segment_target_s=0.5, spool_cap_bytes=2 * 1024**2, stream_queue_messages=8
    )
    sim = Simulation(url=service.url, participants=1, seconds=2, fps=20, size=(1280, 720))
    (stream,) = sim.plan()
    units = [data for _, data, _ in encode_stream(stream, 2, 20, keyframe_interval_s=0.01)]
    start = datetime.now(UTC)
    baseline_rss = service.worker_rss_bytes()
    outage_s3.stop()
    sent_bytes, stalled_at, peak_rss = 0, None, 0
    total = 600
    async with aiohttp.ClientSession() as session, session.ws_connect(service.url) as ws:
        for index in range(total):
            text = orjson.dumps(
                media_message(
                    units[index % len(units)],
                    index / 20,
                    start,
                    "webcam",
                    100,
                    sim.bot_id,
                    sim.recording_id,
                )
            ).decode()
            began = time.monotonic()
            sending = asyncio.create_task(ws.send_str(text))
            done, _ = await asyncio.wait({sending}, timeout=3)
            if not done:
                assert stalled_at is None
                stalled_at = sent_bytes
                peak_rss = service.worker_rss_bytes()
                assert await service.readyz() == 503
                outage_s3.start()
            await sending
            sent_bytes += len(text)
            assert time.monotonic() - began < 60
        assert not ws.closed
    assert stalled_at is not None, "the sender was never slowed"
    assert sent_bytes > 3 * stalled_at / 2
    assert peak_rss - baseline_rss < 300 * 1024**2
    await wait_for_manifest(services, manifest_key(sim, 100), "complete")
    check = await check_stream(services.store, manifest_key(sim, 100), key_prefix="archive/")
    assert check.ok, check.problems
    assert len(check.frames) == total
