"""Media streams against the real process tree with Fargate's 1,024 open files: a client
holding hundreds of streams open costs a bot beside it nothing, and thousands of short
streams leave nothing behind in memory."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import orjson

from archiver.consumers.decode_check import check_stream
from archiver.tools.simulator import media_message, participant_event
from tests.faults.conftest import ServiceProcess, ServiceProcesses
from tests.faults.test_bounded_events import peak_of
from tests.hostile import START, h264_units

PARTICIPANTS = 150


def _ids() -> dict[str, str]:
    return {"bot_id": uuid.uuid4().hex, "recording_id": uuid.uuid4().hex}


def _frame(data: bytes, relative: float, pid: int, ids: dict[str, str]) -> str:
    return orjson.dumps(media_message(data, relative, START, "webcam", pid, **ids)).decode()


async def _streams_released(
    process: ServiceProcess, timeout_s: float = 60, graces_over: bool = False
) -> dict:
    """Until the worker holds no stream, queued frame or session index; with `graces_over`,
    no recording waiting out its grace either (for a service started with a short one)."""
    held = ["streams", "queued_bytes", "session_indexes"]
    if graces_over:
        held.append("recordings_waiting")
    async with asyncio.timeout(timeout_s):
        while True:
            _, body = await process.readiness()
            if not any(body[name] for name in held):
                return body
            await asyncio.sleep(0.05)


async def test_hundreds_of_open_streams_hold_no_file_each_and_cost_a_bot_beside_them_nothing(
    services: ServiceProcesses,
) -> None:
    process = await services.start(open_files=1024, idle_timeout_s=60)
    units = h264_units(seconds=0.3)
    good, good_units = _ids(), h264_units(seconds=3)
    baseline = process.worker_open_files()
    async with (
        peak_of(process.worker_open_files) as files,
        aiohttp.ClientSession() as session,
    ):
        hostile = [await session.ws_connect(process.url) for _ in range(8)]
        for n, ws in enumerate(hostile):
            ids = _ids()
            for pid in range(64):  # as many as a connection may hold open at once
                for relative, data in units:
                    await ws.send_str(_frame(data, relative, pid, ids))
            await ws.send_str(_frame(units[0][1], 0.0, 999, ids))  # one more: refused
            assert not ws.closed, n
        async with session.ws_connect(process.url) as bot:
            for relative, data in good_units:
                await bot.send_str(_frame(data, relative, 100, good))
            leave = participant_event("leave", 100, 3.0, START, **good)
            await bot.send_str(orjson.dumps(leave).decode())
        _, busy = await process.readiness()
        for ws in hostile:
            await ws.close()
        await _streams_released(process)
    assert busy["streams"] >= 8 * 64
    # Journals hold no descriptor between writes: 513 open streams, a handful of files.
    assert files[0] - baseline < 64, (baseline, files[0])
    key = f"{good['bot_id']}/{good['recording_id']}/participants/100/webcam/h264/manifest.json"
    check = await check_stream(services.store, key, key_prefix="archive/")
    assert check.ok, check.problems
    assert [round(f.time_s, 4) for f in check.frames] == [round(t, 4) for t, _ in good_units]
    errors = [line for line in process.logs() if line.get("level") in ("error", "critical")]
    assert not errors, errors[:3]
    log_text = process.log_path.read_text()
    assert "Too many open files" not in log_text
    assert "Traceback" not in log_text


async def test_six_hundred_short_streams_leave_nothing_held_and_memory_flat(
    services: ServiceProcesses,
) -> None:
    """Meeting after meeting (one bot connection each) of 150 participants who each send a
    moment of video and leave: once a meeting is over, the worker holds nothing of it, and
    the memory its streams' C buffers used goes back to the system."""
    process = await services.start(store=f"file://{services.workdir / 'archive'}")
    units = h264_units(seconds=0.2)
    settled: list[int] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            ids = _ids()
            async with session.ws_connect(process.url) as ws:
                for pid in range(PARTICIPANTS):
                    for relative, data in units:
                        await ws.send_str(_frame(data, relative, pid, ids))
                    leave = participant_event("leave", pid, 0.2, START, **ids)
                    await ws.send_str(orjson.dumps(leave).decode())
            await _streams_released(process)
            settled.append(await _settled_rss(process, within_s=6))
    mib = [round(r / 1024**2, 1) for r in settled]
    # Before streams were let go and freed memory returned, each round kept about 60 MB.
    assert settled[-1] - settled[1] < 12 * 1024**2, mib


async def _settled_rss(process: ServiceProcess, within_s: float) -> int:
    """The worker's lowest RSS over a few seconds: freed memory is returned to the system a
    few seconds after the last stream of a burst is let go."""
    lowest = process.worker_rss_bytes()
    async with asyncio.timeout(within_s + 5):
        for _ in range(int(within_s / 0.25)):
            await asyncio.sleep(0.25)
            lowest = min(lowest, process.worker_rss_bytes())
    return lowest
