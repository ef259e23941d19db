"""The events archive and session.json within their budgets, end to end in one process."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from archiver.consumers.decode_check import check_events
from archiver.ingest.server import STATE
from archiver.tools.simulator import participant
from tests.conftest import ServiceFactory
from tests.pipeline.test_events_archive import Meeting, send_all


@pytest.mark.volume
@pytest.mark.slow
async def test_3000_joins_and_leaves_with_alternating_bulky_details_keep_session_json_small(
    service: ServiceFactory,
) -> None:
    running = await service()
    meeting = Meeting()
    versions = [{"guid": "a" * 100_000}, {"guid": "b" * 100_000}]
    sent = []
    for n in range(3000):
        event = meeting.join(100, n * 0.5) if n % 2 == 0 else meeting.leave(100, n * 0.5)
        event["data"]["data"]["participant"]["extra_data"] = versions[(n // 2) % 2]
        sent.append(event)
    await send_all(running, sent)
    await running.settle(timeout_s=60)

    raw = await running.store.get(meeting.recording.session_key)
    assert raw is not None
    assert len(raw) < 16 * 1024, len(raw)  # was 300 KB and more, growing with every event
    (person,) = orjson.loads(raw)["participants"]
    assert person["name"] == "Participant 100"
    assert person["details_truncated"] is True
    joins = [t["relative"] for t in person["joins"]]
    leaves = [t["relative"] for t in person["leaves"]]
    assert (joins[0], joins[-1]) == (0.0, 1499.0)
    assert (leaves[0], leaves[-1]) == (0.5, 1499.5)
    assert len(joins) + person["joins_dropped"] == 1500
    assert len(leaves) + person["leaves_dropped"] == 1500
    # The events archive keeps every event whole.
    check = await check_events(running.store, meeting.recording, key_prefix="archive/")
    assert check.ok, check.problems
    assert check.manifest["events"] == 3000
    assert check.events[1]["data"]["data"]["participant"]["extra_data"] == versions[0]


async def test_one_connection_past_its_recordings_limit_has_the_extras_refused_and_goes_on(
    service: ServiceFactory,
) -> None:
    running = await service(max_event_recordings_per_connection=2, events_batch_bytes=4096)
    meetings = [Meeting() for _ in range(4)]
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        for meeting in meetings:
            await ws.send_str(orjson.dumps(meeting.join(100, 0.0)).decode())
        # A batch of the first recording closes by size; it stays held (and counts) while
        # the connection sends it events.
        bulky = meetings[0].event("transcript.data", {"words": [], "text": "x" * 5000})
        await ws.send_str(orjson.dumps(bulky).decode())
        await ws.close()
        assert ws.close_code == aiohttp.WSCloseCode.OK
    await running.settle()

    assert running.app[STATE].totals["refused_too_many_recordings"] == 2
    first = await check_events(running.store, meetings[0].recording, key_prefix="archive/")
    assert first.ok, first.problems
    assert [b["count"] for b in first.manifest["batches"]] == [2]  # closed by its size
    second = await check_events(running.store, meetings[1].recording, key_prefix="archive/")
    assert second.ok, second.problems
    for refused in meetings[2:]:
        assert await running.store.get(refused.recording.events_manifest_key) is None
    writers = running.app[STATE].writers
    assert not writers.events.logs
    assert not writers.sessions.sessions


async def test_a_quiet_recording_stops_counting_against_the_limit(
    service: ServiceFactory,
) -> None:
    """A connection that moves on from a recording whose events are all written may start
    another (the first is completed, and continued if it speaks again)."""
    running = await service(max_event_recordings_per_connection=1, events_batch_count=1)
    first, second = Meeting(), Meeting()
    chat = {"participant": participant(100), "text": "hello"}
    sent_first = first.event("participant_events.chat_message", chat)
    sent_second = second.event("participant_events.chat_message", chat)
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        await ws.send_str(orjson.dumps(sent_first).decode())
        logs = running.app[STATE].writers.events.logs
        async with asyncio.timeout(10):
            # Until its one-event batch is in the spool.
            while first.recording not in logs or not logs[first.recording].quiet:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await ws.send_str(orjson.dumps(sent_second).decode())
    await running.settle()
    assert running.app[STATE].totals["refused_too_many_recordings"] == 0
    for meeting, event in ((first, sent_first), (second, sent_second)):
        check = await check_events(running.store, meeting.recording, key_prefix="archive/")
        assert check.events == [event]
        assert check.manifest["status"] == "complete"
