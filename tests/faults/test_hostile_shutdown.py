"""One client opening recordings and short streams by the thousand, against the real process
tree: memory settles round after round, and a drain the load pushes past its deadline still
ends in order, with nothing left running and no traceback."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp
import orjson
import pytest

from archiver.tools.simulator import media_message, participant_event
from tests.faults.conftest import ServiceProcess, ServiceProcesses
from tests.faults.test_bounded_streams import _settled_rss, _streams_released
from tests.hostile import START, h264_units

CONNECTIONS = 20
STREAMS_PER_CONNECTION = 64
"""As many as a connection may hold open at once: a round is 1,280 short streams."""
DRAIN_DEADLINE_S = 3.0
GRACE_MARGIN_S = 10.0
"""The supervisor's: a worker still running this long after the deadline is killed."""
DISORDER = ("Traceback", "Task was destroyed", "Exception ignored", "never retrieved")


def _frame(data: bytes, relative: float, pid: int, bot: str, recording: str) -> str:
    message = media_message(data, relative, START, "webcam", pid, bot, recording)
    return orjson.dumps(message).decode()


def _join(pid: int, bot: str, recording: str) -> str:
    return orjson.dumps(participant_event("join", pid, 0.0, START, bot, recording)).decode()


async def _short_streams(url: str, connections: int, recordings: int = 0) -> None:
    """`connections` connections at once, each with 64 streams of two frames, each stream in
    a recording of its own; `recordings` more recordings opened by a join event only."""
    units = h264_units(seconds=0.2)[:2]

    async def one(number: int) -> None:
        bot = f"bot-{uuid.uuid4().hex[:12]}"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            for pid in range(STREAMS_PER_CONNECTION):
                recording = uuid.uuid4().hex
                for relative, data in units:
                    await ws.send_str(_frame(data, relative, pid, bot, recording))
            for n in range(number, recordings, connections):
                await ws.send_str(_join(n, bot, uuid.uuid4().hex))

    await asyncio.gather(*(one(n) for n in range(connections)))


def _disorder(process: ServiceProcess) -> dict[str, int]:
    text = process.log_path.read_text()
    return {needle: text.count(needle) for needle in DISORDER if needle in text}


async def test_a_second_round_of_short_streams_costs_no_memory(
    services: ServiceProcesses,
) -> None:
    """Two rounds of 1,280 short streams, each in a recording of its own: once a round is
    over the worker holds nothing of it, and the memory the second round used goes back."""
    process = await services.start(
        store=f"file://{services.workdir / 'archive'}", recording_ready_grace_s=0.5
    )
    settled = []
    for _ in range(2):
        await _short_streams(process.url, CONNECTIONS)
        await _streams_released(process, timeout_s=120, graces_over=True)
        settled.append(await _settled_rss(process, within_s=6))
    mib = [round(rss / 1024**2, 1) for rss in settled]
    print(f"\nsettled RSS after each round of 1,280 short streams: {mib} MiB")
    assert settled[1] - settled[0] < 10 * 1024**2, mib
    assert await process.stop() == 0
    assert not _disorder(process)


@pytest.mark.parametrize("fallback", [False, True], ids=["alone", "with_fallback"])
async def test_a_drain_past_its_deadline_ends_in_order(
    services: ServiceProcesses, fallback: bool
) -> None:
    """2,560 short streams and 1,500 more recordings, then SIGTERM at once: the drain cannot
    finish in 3 s. The worker stops the pipeline at the deadline, ends every task before its
    thread pools close, names what the spool still holds in one line, and exits on its own
    well before the supervisor would kill it."""
    settings: dict[str, Any] = {"drain_deadline_s": DRAIN_DEADLINE_S}
    if fallback:
        settings["fallback_store"] = f"file://{services.workdir / 'fallback'}"
    process = await services.start(**settings)
    await _short_streams(process.url, 2 * CONNECTIONS, recordings=1500)
    began = time.monotonic()
    assert await process.stop() == 0
    took_s = time.monotonic() - began

    logs = process.logs()
    events = [line["event"] for line in logs]
    passed = [line for line in logs if line["event"] == "drain_deadline_passed"]
    print(
        f"\nSIGTERM under load: exited in {took_s:.1f} s (deadline {DRAIN_DEADLINE_S:g} s); "
        + (
            f"left in the spool: {passed[0]['left_in_spool']}, streams unfinished: "
            f"{len(passed[0]['unfinished_streams'])}, tasks outlived: "
            f"{passed[0]['tasks_outlived']}, fallback in use: {passed[0]['fallback_in_use']}, "
            f"evacuated to it: {passed[0]['evacuated_to_fallback']}"
            if passed
            else "the drain finished in time"
        )
    )
    assert not _disorder(process), _disorder(process)
    assert "service_stopped" in events, "the worker did not get to the end of its shutdown"
    assert took_s < DRAIN_DEADLINE_S + GRACE_MARGIN_S - 1
    assert len(passed) == 1, "the load was meant to push the drain past its deadline"
    line = passed[0]
    assert line["tasks_outlived"] == []
    assert line["left_in_spool"] == len(line["left_in_spool_keys"])
    # From half the deadline on, what the primary had not taken went to the fallback, and
    # what the deadline left in the spool was sent there after it.
    assert line["fallback_in_use"] is fallback
    if fallback:
        assert line["evacuated_to_fallback"] > 0
        assert line["left_in_spool"] == 0, line["left_in_spool_keys"][:5]
        assert any((services.workdir / "fallback").rglob("*.json"))
    else:
        assert line["evacuated_to_fallback"] == 0
