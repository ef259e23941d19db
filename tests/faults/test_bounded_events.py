"""Events and session documents against the real process tree: a hostile client costs only
itself, whatever it sends, and nothing of an ended recording stays in memory."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from archiver.consumers.decode_check import check_events, check_stream
from archiver.layout import RecordingId
from archiver.tools.simulator import envelope, media_message, participant_event
from tests.faults.conftest import ServiceProcess, ServiceProcesses
from tests.hostile import START, h264_units


def _ids() -> dict[str, str]:
    return {"bot_id": uuid.uuid4().hex, "recording_id": uuid.uuid4().hex}


@contextlib.asynccontextmanager
async def peak_of(measure: Callable[[], int]) -> AsyncIterator[list[int]]:
    """Sample `measure` every 20 ms while the block runs; the list holds the peak."""
    peak = [measure()]

    async def sample() -> None:
        while True:
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], measure())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        yield peak
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler


async def wait_until_released(process: ServiceProcess, timeout_s: float = 20) -> dict[str, Any]:
    """Until the worker holds no events log, session index or queued batch."""
    async with asyncio.timeout(timeout_s):
        while True:
            _, body = await process.readiness()
            if not (body["events_logs"] or body["session_indexes"] or body["events_queued_bytes"]):
                return body
            await asyncio.sleep(0.05)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


async def test_a_client_opening_1500_recordings_costs_a_bot_beside_it_nothing(
    services: ServiceProcesses,
) -> None:
    """One connection sends a tiny event for each of 1,500 recordings, as fast as it can,
    to a service limited to 1,024 open files as on Fargate; a bot streams video and events
    on its own connection meanwhile."""
    process = await services.start(open_files=1024)
    bot = _ids()
    bot_recording = RecordingId(bot["bot_id"], bot["recording_id"])
    units = h264_units(seconds=2.0)
    hostile_sent = 1500

    async def hostile(session: aiohttp.ClientSession) -> int | None:
        async with session.ws_connect(process.url) as ws:
            for _ in range(hostile_sent):
                event = envelope("participant_events.chat_message", {"text": "hi"}, **_ids())
                await ws.send_str(orjson.dumps(event).decode())
            await ws.close()
        return ws.close_code

    async def well_behaved(session: aiohttp.ClientSession) -> int | None:
        async with session.ws_connect(process.url) as ws:
            join = participant_event("join", 100, 0.0, START, **bot)
            await ws.send_str(orjson.dumps(join).decode())
            for relative, data in units:
                message = media_message(data, relative, START, "webcam", 100, **bot)
                await ws.send_str(orjson.dumps(message).decode())
                await asyncio.sleep(0.005)
            leave = participant_event("leave", 100, 2.0, START, **bot)
            await ws.send_str(orjson.dumps(leave).decode())
            await ws.close()
        return ws.close_code

    async with peak_of(process.worker_open_files) as open_files, aiohttp.ClientSession() as s:
        baseline = open_files[0]
        close_codes = await asyncio.gather(hostile(s), well_behaved(s))
        await wait_until_released(process)
    assert close_codes == [aiohttp.WSCloseCode.OK] * 2  # neither was dropped

    key = f"{bot_recording.prefix}/participants/100/webcam/h264/manifest.json"
    video = await check_stream(services.store, key, key_prefix="archive/")
    assert video.ok, video.problems
    assert len(video.frames) == len(units)
    events = await check_events(services.store, bot_recording, key_prefix="archive/")
    assert events.ok, events.problems
    assert [e["event"] for e in events.events] == [
        "participant_events.join",
        "participant_events.leave",
    ]

    await process.stop()
    text = process.log_path.read_text()
    for symptom in ("Too many open files", "EMFILE", "Traceback"):
        assert symptom not in text
    closed = [line for line in process.logs() if line.get("event") == "connection_closed"]
    (flood,) = [line for line in closed if line.get("events") == hostile_sent]
    allowed = 4  # ARCHIVER_MAX_EVENT_RECORDINGS_PER_CONNECTION's default
    assert flood["refused_too_many_recordings"] == hostile_sent - allowed
    # The worker's own files, sockets and pipes, and a few journals: not one per recording.
    assert open_files[0] - baseline < 40, (baseline, open_files[0])


async def test_large_events_slow_their_sender_and_keep_memory_and_disk_bounded(
    services: ServiceProcesses,
) -> None:
    """Forty 3.9 MiB events (just under the largest message) on one connection with a 1 MiB
    spool: the sender is read only as fast as the spool takes its batches; the worker's
    memory and journal stay small."""
    process = await services.start(spool_cap_bytes=1024 * 1024)
    ids = _ids()
    recording = RecordingId(ids["bot_id"], ids["recording_id"])
    journal = process.slot() / "journal"
    count, size = 40, 4 * 1024 * 1024 - 64 * 1024
    sent = [
        envelope("transcript.data", {"n": n, "blob": f"{n:02d}" * (size // 2)}, **ids)
        for n in range(count)
    ]
    rss_before = process.worker_rss_bytes()
    async with (
        peak_of(process.worker_rss_bytes) as rss,
        peak_of(lambda: folder_bytes(journal)) as on_disk,
        aiohttp.ClientSession() as session,
        session.ws_connect(process.url) as ws,
    ):
        for event in sent:
            await ws.send_str(orjson.dumps(event).decode())
        await ws.close()
        await wait_until_released(process, timeout_s=60)

    check = await check_events(services.store, recording, key_prefix="archive/")
    assert check.ok, check.problems
    assert [e["data"]["data"]["n"] for e in check.events] == list(range(count))
    assert all(b["count"] == 1 for b in check.manifest["batches"])  # one event, one batch
    growth_mib = (rss[0] - rss_before) / 1024**2
    # Before the budgets the open batch held every event: +500 MB for sixty 8 MiB events.
    assert growth_mib < 120, growth_mib
    assert on_disk[0] < 40 * 1024**2, on_disk[0]


async def test_thousands_of_short_recordings_leave_nothing_in_memory(
    services: ServiceProcesses,
) -> None:
    """Rounds of short recordings (a join and a leave each): after each round the worker
    holds no events log or session index, and its memory stops growing."""
    per_round, rounds = 120, 4
    process = await services.start(max_event_recordings_per_connection=per_round)
    samples: list[int] = []
    for _ in range(rounds):
        recordings = [_ids() for _ in range(per_round)]
        async with aiohttp.ClientSession() as session, session.ws_connect(process.url) as ws:
            for ids in recordings:
                for kind, relative in (("join", 0.0), ("leave", 1.0)):
                    event = participant_event(kind, 100, relative, START, **ids)
                    await ws.send_str(orjson.dumps(event).decode())
        await wait_until_released(process)
        samples.append(process.worker_rss_bytes())

    last = recordings[-1]
    recording = RecordingId(last["bot_id"], last["recording_id"])
    check = await check_events(services.store, recording, key_prefix="archive/")
    assert check.ok, check.problems
    assert check.manifest["status"] == "complete"
    session_json = orjson.loads(await services.store.get(recording.session_key) or b"{}")
    assert session_json["events"]["status"] == "complete"
    growth_mib = (samples[-1] - samples[1]) / 1024**2
    assert growth_mib < 8, [round(s / 1024**2, 1) for s in samples]
