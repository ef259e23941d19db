"""When streams end: idle timeout, participant leave, connection close; and how they resume."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest

from archiver.consumers.decode_check import check_events, check_stream
from archiver.ingest.server import STATE
from archiver.layout import RecordingId
from archiver.store.s3 import S3Store
from archiver.tools.simulator import Simulation, encode_stream, media_message, participant_event
from archiver.values import MediaMessage
from tests.conftest import RunningService, ServiceFactory


class Bot:
    """Sends pre-encoded access units of one participant's webcam on a live websocket."""

    def __init__(
        self,
        running: RunningService,
        seconds: float = 4,
        fps: float = 10,
        keyframe_interval_s: float | None = 1,
    ) -> None:
        self.sim = Simulation(url=running.url, participants=1, seconds=seconds, fps=fps)
        (stream,) = self.sim.plan()
        self.units = list(encode_stream(stream, seconds, fps, keyframe_interval_s))
        self.start = datetime.now(UTC)
        self.ids = {"bot_id": self.sim.bot_id, "recording_id": self.sim.recording_id}
        self.manifest_key = (
            f"{self.sim.bot_id}/{self.sim.recording_id}/participants/100/webcam/h264/manifest.json"
        )

    async def send(self, ws: aiohttp.ClientWebSocketResponse, first: int, last: int) -> None:
        for relative, data, _ in self.units[first:last]:
            message = media_message(data, relative, self.start, "webcam", 100, **self.ids)
            await ws.send_str(orjson.dumps(message).decode())


async def wait_for_status(running: RunningService, key: str, status: str) -> dict:
    for _ in range(200):
        raw = await running.store.get(key)
        if raw is not None and orjson.loads(raw)["status"] == status:
            return orjson.loads(raw)
        await asyncio.sleep(0.05)
    raise AssertionError(f"{key} never reached status {status}")


async def wait_for_live_listing(running: RunningService, session_key: str, key: str) -> None:
    """Until the recording's session.json lists the stream as live."""
    for _ in range(200):
        raw = await running.store.get(session_key)
        streams = orjson.loads(raw)["streams"] if raw is not None else []
        if any(s["manifest_key"] == key and s["status"] == "live" for s in streams):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{session_key} never listed {key} as live")


async def test_idle_stream_ends_with_a_complete_manifest_and_a_later_frame_continues_it(
    service: ServiceFactory,
) -> None:
    running = await service(idle_timeout_s=0.5)
    bot = Bot(running)
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        await bot.send(ws, 0, 20)
        ended = await wait_for_status(running, bot.manifest_key, "complete")
        assert sum(s["frames"] for s in ended["segments"]) == 20
        await bot.send(ws, 20, 40)
    await running.settle()
    check = await check_stream(running.store, bot.manifest_key, key_prefix="archive/")
    assert check.ok, check.problems
    assert check.manifest["status"] == "complete"
    assert len(check.frames) == 40
    seqs = [s["seq"] for s in check.manifest["segments"]]
    assert seqs == list(range(len(seqs)))


async def test_leave_event_ends_the_participants_streams(service: ServiceFactory) -> None:
    running = await service()
    bot = Bot(running)
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        await bot.send(ws, 0, 15)
        leave = participant_event("leave", 100, 1.5, bot.start, **bot.ids)
        await ws.send_str(orjson.dumps(leave).decode())
        manifest = await wait_for_status(running, bot.manifest_key, "complete")
        assert not ws.closed
    assert sum(s["frames"] for s in manifest["segments"]) == 15


async def test_reconnect_to_a_new_process_continues_the_manifest(
    service: ServiceFactory, s3
) -> None:
    first = await service()
    bot = Bot(first)
    async with aiohttp.ClientSession() as session, session.ws_connect(first.url) as ws:
        await bot.send(ws, 0, 20)
    await first.settle()
    await first.runner.cleanup()
    before = {k: s3.head_object(Bucket=first.bucket, Key=k)["ETag"] for k in first.object_keys()}

    second = await service()
    async with aiohttp.ClientSession() as session, session.ws_connect(second.url) as ws:
        await bot.send(ws, 20, 40)
    await second.settle()
    check = await check_stream(second.store, bot.manifest_key, key_prefix="archive/")
    assert check.ok, check.problems
    assert len(check.frames) == 40
    seqs = [s["seq"] for s in check.manifest["segments"]]
    assert seqs == list(range(len(seqs)))
    after = {k: s3.head_object(Bucket=first.bucket, Key=k)["ETag"] for k in second.object_keys()}
    changed = {k for k in before if after[k] != before[k]}
    assert all(k.endswith(("manifest.json", "playlist.m3u8", "session.json")) for k in changed)


async def test_a_reconnect_mid_gop_to_a_new_process_keeps_every_frame(
    service: ServiceFactory,
) -> None:
    """The sender's only key frame went to the first process: the second continues from the
    archive's last init segment, and the whole stream decodes in order."""
    first = await service(spool_dir="spool-a")
    bot = Bot(first, keyframe_interval_s=None)
    async with aiohttp.ClientSession() as session, session.ws_connect(first.url) as ws:
        await bot.send(ws, 0, 20)
    await first.settle()
    second = await service(spool_dir="spool-b")
    async with aiohttp.ClientSession() as session, session.ws_connect(second.url) as ws:
        await bot.send(ws, 20, 40)
    await second.settle()
    check = await check_stream(second.store, bot.manifest_key, key_prefix="archive/")
    assert check.ok, check.problems
    assert [round(f.time_s, 3) for f in check.frames] == [round(u[0], 3) for u in bot.units]
    counters = check.manifest["counters"]
    assert counters["continuations"] == 1
    assert counters.get("dropped_before_keyframe", 0) == 0
    continued = [s for s in check.manifest["segments"] if s["start"] >= 2.0]
    assert continued[0]["continues"]
    assert not continued[0]["starts_with_keyframe"]
    assert len({s["init_key"] for s in check.manifest["segments"]}) == 1
    assert check.manifest["gaps"] == []


async def test_a_reconnect_that_outruns_the_old_process_s_last_upload_keeps_every_frame(
    service: ServiceFactory,
) -> None:
    """The first process still holds the GOP's key frame in its open segment when the bot's
    new connection reaches the second: the second holds those frames until the first has
    listed that segment, then continues from it."""
    first = await service(spool_dir="spool-a")
    second = await service(spool_dir="spool-b")
    bot = Bot(first, keyframe_interval_s=None)
    session_key = f"{bot.sim.bot_id}/{bot.sim.recording_id}/session.json"
    async with aiohttp.ClientSession() as session:
        old = await session.ws_connect(first.url)
        await bot.send(old, 0, 20)
        await wait_for_live_listing(first, session_key, bot.manifest_key)
        async with session.ws_connect(second.url) as new:
            await bot.send(new, 20, 30)
            await asyncio.sleep(0.5)
            assert await second.store.get(bot.manifest_key) is None
            await old.close()
            await bot.send(new, 30, 40)
        await first.settle()
    await second.settle()
    check = await check_stream(second.store, bot.manifest_key, key_prefix="archive/")
    assert check.ok, check.problems
    assert [round(f.time_s, 3) for f in check.frames] == [round(u[0], 3) for u in bot.units]
    assert check.manifest["counters"].get("dropped_before_keyframe", 0) == 0
    assert check.manifest["counters"]["received"] == 40
    assert check.manifest["status"] == "complete"


async def test_frames_after_a_three_second_disconnection_are_kept_and_the_gap_recorded(
    service: ServiceFactory,
) -> None:
    first = await service(spool_dir="spool-a")
    bot = Bot(first, seconds=6, keyframe_interval_s=None)
    async with aiohttp.ClientSession() as session, session.ws_connect(first.url) as ws:
        await bot.send(ws, 0, 20)
    await first.settle()
    second = await service(spool_dir="spool-b")
    async with aiohttp.ClientSession() as session, session.ws_connect(second.url) as ws:
        await bot.send(ws, 50, 60)  # what the sender encoded meanwhile never arrived
    await second.settle()
    manifest = await second.json(bot.manifest_key)
    assert sum(s["frames"] for s in manifest["segments"]) == 30
    assert manifest["gaps"] == [
        {"start": 2.0, "end": 5.0, "reason": "not_received", "references_missing": True}
    ]
    assert manifest["counters"]["received"] == manifest["counters"]["archived"] == 30


async def test_two_machines_writing_one_stream_both_end_up_in_its_manifest(
    service: ServiceFactory, s3
) -> None:
    """The bot reconnects to machine B while machine A still holds the stream (it has not
    yet noticed the connection is gone); whichever writes last, neither loses its segments."""
    machine_a = await service(spool_dir="spool-a")
    machine_b = await service(spool_dir="spool-b")
    bot = Bot(machine_a, seconds=6)
    async with aiohttp.ClientSession() as session:
        stale = await session.ws_connect(machine_a.url)
        joined = orjson.dumps(participant_event("join", 100, 0.0, bot.start, **bot.ids))
        await stale.send_str(joined.decode())
        await bot.send(stale, 0, 25)
        await wait_for_status(machine_a, bot.manifest_key, "live")
        async with session.ws_connect(machine_b.url) as ws:
            await bot.send(ws, 30, 60)
            left = orjson.dumps(participant_event("leave", 100, 6.0, bot.start, **bot.ids))
            await ws.send_str(left.decode())
        await machine_b.settle()
        await stale.close()
    await machine_a.settle()
    recording = RecordingId(bot.sim.bot_id, bot.sim.recording_id)
    events = await check_events(machine_a.store, recording, key_prefix="archive/")
    assert events.ok, events.problems
    assert sorted(events.lines) == sorted([joined, left])
    session_index = await machine_a.json(recording.session_key)
    (person,) = session_index["participants"]
    assert [t["relative"] for t in person["joins"]] == [0.0]
    assert [t["relative"] for t in person["leaves"]] == [6.0]
    check = await check_stream(machine_a.store, bot.manifest_key, key_prefix="archive/")
    assert check.ok, check.problems
    assert len(check.frames) == 55
    starts = [s["start"] for s in check.manifest["segments"]]
    assert starts == sorted(starts)
    assert [s["seq"] for s in check.manifest["segments"]] == list(range(len(starts)))
    assert check.manifest["status"] == "complete"


async def test_frames_after_a_repeated_leave_are_archived_too(service: ServiceFactory) -> None:
    running = await service()
    bot = Bot(running)
    leave = orjson.dumps(participant_event("leave", 100, 3.0, bot.start, **bot.ids)).decode()
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        await bot.send(ws, 0, 30)
        await ws.send_str(leave)
        await ws.send_str(leave)
        await bot.send(ws, 30, 40)
    await running.settle()
    check = await check_stream(running.store, bot.manifest_key, key_prefix="archive/")
    assert check.ok, check.problems
    assert check.manifest["status"] == "complete"
    assert [round(f.time_s, 3) for f in check.frames] == [round(u[0], 3) for u in bot.units[:40]]
    assert check.manifest["counters"]["received"] == 40


async def test_a_reconnect_overlapping_the_old_socket_loses_nothing(
    service: ServiceFactory,
) -> None:
    running = await service()
    bot = Bot(running)
    leave = orjson.dumps(participant_event("leave", 100, 3.0, bot.start, **bot.ids)).decode()
    async with aiohttp.ClientSession() as session:
        old = await session.ws_connect(running.url)
        await bot.send(old, 0, 20)
        async with session.ws_connect(running.url) as new:
            await bot.send(new, 20, 30)
            await new.send_str(leave)
            await old.close()
            await bot.send(new, 30, 40)
    await running.settle()
    check = await check_stream(running.store, bot.manifest_key, key_prefix="archive/")
    assert check.ok, check.problems
    assert check.manifest["status"] == "complete"
    assert len(check.frames) == 40
    assert check.manifest["counters"]["received"] == 40


@pytest.mark.volume
@pytest.mark.slow
async def test_hundreds_of_participants_coming_and_going_on_one_connection_are_all_archived(
    service: ServiceFactory,
) -> None:
    """A webinar with rotating speakers: far more participants over the meeting than the
    per-connection limit, never more than a few at once."""
    running = await service(max_streams_per_connection=4)
    bot = Bot(running, seconds=0.3)
    participants = range(1000, 1240)
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        for n, pid in enumerate(participants):
            base = n * 0.5
            for relative, data, _ in bot.units:
                message = media_message(data, base + relative, bot.start, "webcam", pid, **bot.ids)
                await ws.send_str(orjson.dumps(message).decode())
            leave = participant_event("leave", pid, base + 0.4, bot.start, **bot.ids)
            await ws.send_str(orjson.dumps(leave).decode())
            if n % 40 == 39:
                await asyncio.sleep(0.2)  # let the ended streams finish, as in a real meeting
        assert not ws.closed
    await running.settle(timeout_s=120)
    prefix = f"{bot.sim.bot_id}/{bot.sim.recording_id}/participants"
    session_index = await running.json(f"{prefix.rsplit('/', 1)[0]}/session.json")
    assert len(session_index["streams"]) == len(participants)
    for pid in (participants[0], participants[len(participants) // 2], participants[-1]):
        key = f"{prefix}/{pid}/webcam/h264/manifest.json"
        check = await check_stream(running.store, key, key_prefix="archive/")
        assert check.ok, check.problems
        assert len(check.frames) == len(bot.units)
    assert running.app[STATE].totals["refused_too_many_streams"] == 0


async def test_too_many_streams_at_once_refuses_only_the_extra_stream(
    service: ServiceFactory,
) -> None:
    running = await service(max_streams_per_connection=2)
    bot = Bot(running, seconds=1)
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        for relative, data, _ in bot.units:
            for pid in (1, 2, 3):
                message = media_message(data, relative, bot.start, "webcam", pid, **bot.ids)
                await ws.send_str(orjson.dumps(message).decode())
        assert not ws.closed
    await running.settle()
    prefix = f"{bot.sim.bot_id}/{bot.sim.recording_id}/participants"
    for pid in (1, 2):
        check = await check_stream(
            running.store, f"{prefix}/{pid}/webcam/h264/manifest.json", key_prefix="archive/"
        )
        assert check.ok, check.problems
        assert len(check.frames) == len(bot.units)
    assert await running.store.get(f"{prefix}/3/webcam/h264/manifest.json") is None
    assert running.app[STATE].totals["refused_too_many_streams"] == len(bot.units)


async def test_a_stalled_stream_sheds_its_own_frames_and_never_blocks_its_neighbour(
    service: ServiceFactory,
) -> None:
    """One stream's worker hangs on a thread (as a bug or a stuck disk would make it); the
    other participant on the same connection goes on being read and archived."""
    stuck, release = 100, threading.Event()

    class OneStreamHangs(ThreadPoolExecutor):
        """The segmenting threads, on which every batch of participant 100 hangs."""

        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            batch = args[0] if args and isinstance(args[0], list) else []
            if (
                batch
                and isinstance(batch[0], MediaMessage)
                and str(batch[0].participant.get("id")) == str(stuck)
            ):
                return super().submit(_after, release, fn, *args)
            return super().submit(fn, *args, **kwargs)

    running = await service(
        segmenting=OneStreamHangs(max_workers=4), stream_queue_messages=4, stream_stall_s=1.0
    )
    bot = Bot(running)
    sending_started = time.monotonic()
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        for relative, data, _ in bot.units:
            for pid in (stuck, 101):
                message = media_message(data, relative, bot.start, "webcam", pid, **bot.ids)
                await ws.send_str(orjson.dumps(message).decode())
        prefix = f"{bot.sim.bot_id}/{bot.sim.recording_id}/participants"
        neighbour = f"{prefix}/101/webcam/h264/manifest.json"
        leave = participant_event("leave", 101, 4.0, bot.start, **bot.ids)
        await ws.send_str(orjson.dumps(leave).decode())
        manifest = await wait_for_status(running, neighbour, "complete")
        held_up_s = time.monotonic() - sending_started
        release.set()
    await running.settle()
    assert held_up_s < 10
    assert sum(s["frames"] for s in manifest["segments"]) == len(bot.units)
    check = await check_stream(running.store, neighbour, key_prefix="archive/")
    assert check.ok, check.problems
    stuck_check = await check_stream(
        running.store, f"{prefix}/{stuck}/webcam/h264/manifest.json", key_prefix="archive/"
    )
    assert stuck_check.ok, stuck_check.problems
    shed = stuck_check.manifest["counters"]["dropped_backlog"]
    assert shed > 0
    assert len(stuck_check.frames) + shed == len(bot.units)


def _after(release: threading.Event, fn: Any, *args: Any) -> Any:
    release.wait(timeout=30)
    return fn(*args)


async def test_the_longest_ids_accepted_still_fit_local_file_names(
    service: ServiceFactory,
) -> None:
    running = await service()
    bot = Bot(running, seconds=1)
    bot.ids = {"bot_id": "b" * 128, "recording_id": "r" * 128}
    recording = RecordingId(bot.ids["bot_id"], bot.ids["recording_id"])
    manifest_key = f"{recording.prefix}/participants/100/webcam/h264/manifest.json"
    join = participant_event("join", 100, 0.0, bot.start, **bot.ids)
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        await ws.send_str(orjson.dumps(join).decode())
        await bot.send(ws, 0, len(bot.units))
        assert not ws.closed
    await running.settle()
    check = await check_stream(running.store, manifest_key, key_prefix="archive/")
    assert check.ok, check.problems
    assert len(check.frames) == len(bot.units)
    events = await check_events(running.store, recording, key_prefix="archive/")
    assert events.ok, events.problems
    assert len(events.lines) == 1


async def test_a_leave_after_every_frame_does_not_close_and_reopen_the_stream(
    service: ServiceFactory,
) -> None:
    running = await service(leave_grace_s=2.0)
    bot = Bot(running, seconds=10)
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        for index, (relative, data, _) in enumerate(bot.units):
            message = media_message(data, relative, bot.start, "webcam", 100, **bot.ids)
            await ws.send_str(orjson.dumps(message).decode())
            leave = participant_event("leave", 100, relative, bot.start, **bot.ids)
            await ws.send_str(orjson.dumps(leave).decode())
            if index % 20 == 19:
                await asyncio.sleep(0.05)
    await running.settle()
    check = await check_stream(running.store, bot.manifest_key, key_prefix="archive/")
    assert check.ok, check.problems
    assert len(check.frames) == len(bot.units) == 100
    counters = check.manifest["counters"]
    assert counters["continued_after_leave"] >= 1
    spool = running.app[STATE].spool
    # 5 segments, their init, a few manifests, the session index and the events: not one
    # final manifest and index per frame.
    assert spool.counters["uploaded"] < 30, spool.counters


async def test_a_connection_that_fills_its_queue_budget_is_slowed_alone(
    service: ServiceFactory,
) -> None:
    """A client whose streams do not drain (here: still opening, which is waited for, not
    shed) may hold its own budget of queued bytes, not the process's: another bot goes on
    being read and archived."""
    release = asyncio.Event()

    class ManifestsOfTheHostileStreamsTakeForever(S3Store):
        async def fetch(self, key: str) -> tuple[bytes, str] | None:
            if "/participants/50" in key and key.endswith("/manifest.json"):
                await release.wait()
            return await super().fetch(key)

    running = await service(
        store_class=ManifestsOfTheHostileStreamsTakeForever, connection_queued_bytes=1024**2
    )
    hostile_bot, good = Bot(running, seconds=4), Bot(running, seconds=4)
    registry = running.app[STATE].writers.streams
    async with aiohttp.ClientSession() as session:
        hostile = await session.ws_connect(running.url)

        async def flood() -> None:
            for relative, data, _ in hostile_bot.units:
                for pid in range(500, 510):
                    message = media_message(
                        data + b"\x00" * 40_000,
                        relative,
                        hostile_bot.start,
                        "webcam",
                        pid,
                        **hostile_bot.ids,
                    )
                    await hostile.send_str(orjson.dumps(message).decode())

        flooding = asyncio.create_task(flood())
        async with asyncio.timeout(10):  # until the hostile streams hold their budget
            while registry.queued.used < 1024**2 // 2:  # noqa: ASYNC110 (a counter)
                await asyncio.sleep(0.02)
        async with session.ws_connect(running.url) as ws:
            await good.send(ws, 0, len(good.units))
            leave = participant_event("leave", 100, 4.0, good.start, **good.ids)
            await ws.send_str(orjson.dumps(leave).decode())
            manifest = await wait_for_status(running, good.manifest_key, "complete")
        held = registry.queued.used
        assert not flooding.done(), "the flooding client was never slowed"
        release.set()
        await flooding
        await hostile.close()
    await running.settle()
    assert held <= 1024**2 + 64 * 1024, held
    assert sum(s["frames"] for s in manifest["segments"]) == len(good.units)


async def test_a_stream_and_an_events_log_that_end_are_freed_at_once(
    service: ServiceFactory,
) -> None:
    """Streams come and go by the thousand: each must be freed, with its muxer's C buffers,
    as soon as it is let go, not whenever the cycle collector next runs (memory that a burst
    of streams left for it came back only at random)."""
    running = await service()
    writers = running.app[STATE].writers
    bot = Bot(running)
    gc.disable()
    try:
        async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
            await bot.send(ws, 0, 15)
            join = participant_event("join", 100, 0.0, bot.start, **bot.ids)
            await ws.send_str(orjson.dumps(join).decode())
            async with asyncio.timeout(10):
                while not (writers.streams.streams and writers.events.logs):  # noqa: ASYNC110 (dicts)
                    await asyncio.sleep(0.02)
            held = [
                weakref.ref(s)
                for s in [*writers.streams.streams.values(), *writers.events.logs.values()]
            ]
        await running.settle()
        async with asyncio.timeout(10):
            while writers.streams.streams or writers.events.logs:  # noqa: ASYNC110 (dicts)
                await asyncio.sleep(0.02)
        assert [ref() for ref in held] == [None, None]
    finally:
        gc.enable()
