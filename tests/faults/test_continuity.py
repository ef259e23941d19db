"""Every frame after the first key frame, wherever the next one lands: a deploy (SIGTERM, a
fresh task with an empty spool on the same bucket) and a reconnect that lands on another
worker while the old socket is still open, with real processes and senders that continue
mid-GOP, as WebRTC senders do."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
import orjson

from archiver.consumers.decode_check import check_stream
from archiver.documents.playlists import PLAYLIST_NAME
from archiver.tools.simulator import (
    SimulatedStream,
    close_like_a_bot,
    encode_stream,
    media_message,
    participant_event,
    watch_for_close,
)
from tests.faults.conftest import ServiceProcess, ServiceProcesses

BOT = "bot-continuity"
RECORDING = "rec-1"


def manifest_key(participant_id: int) -> str:
    return f"{BOT}/{RECORDING}/participants/{participant_id}/webcam/h264/manifest.json"


@dataclass
class Sender:
    """One participant's webcam, encoded ahead: `keyframe_interval_s` None sends a single
    key frame, at the start."""

    participant_id: int
    fps: float
    seconds: float
    keyframe_interval_s: float | None
    units: list[tuple[float, bytes]] = field(default_factory=list)

    def encode(self) -> None:
        plan = SimulatedStream(self.participant_id, "webcam", [(0.0, (320, 240))])
        self.units = [
            (relative, data)
            for relative, data, _ in encode_stream(
                plan, self.seconds, self.fps, self.keyframe_interval_s
            )
        ]


class ReconnectingBot:
    """Sends its participants' frames in real time, like a bot; when the service closes
    the connection (1012 on a drain), it reconnects to wherever `target` points now and
    goes on with the next frame: nothing is replayed, and the encoder is not restarted. A
    frame counts as sent only when it was written before the bot saw the close."""

    def __init__(self, senders: list[Sender], target: Callable[[], str]) -> None:
        self.senders = senders
        self.target = target
        self.start = datetime.now(UTC)
        self.sent = {sender.participant_id: 0 for sender in senders}
        self.connections = 0

    def timeline(self) -> list[tuple[float, int, bytes]]:
        return sorted(
            (relative, sender.participant_id, data)
            for sender in self.senders
            for relative, data in sender.units
        )

    async def run(self) -> None:
        timeline = self.timeline()
        loop = asyncio.get_running_loop()
        began = loop.time()
        position = 0
        async with aiohttp.ClientSession() as session:
            while position < len(timeline):
                ws = await self._connect(session)
                closed = asyncio.Event()
                watcher = asyncio.create_task(watch_for_close(ws, closed))
                while position < len(timeline) and not closed.is_set():
                    relative, participant_id, data = timeline[position]
                    delay = relative - (loop.time() - began)
                    if delay > 0:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(delay):
                                await closed.wait()
                        if closed.is_set():
                            break
                    message = media_message(
                        data, relative, self.start, "webcam", participant_id, BOT, RECORDING
                    )
                    try:
                        await ws.send_str(orjson.dumps(message).decode())
                    except (aiohttp.ClientError, ConnectionError):
                        break
                    self.sent[participant_id] += 1
                    position += 1
                await close_like_a_bot(ws, watcher)

    async def _connect(self, session: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
        async with asyncio.timeout(30):
            while True:
                try:
                    ws = await session.ws_connect(self.target())
                except (aiohttp.ClientError, ConnectionError):
                    await asyncio.sleep(0.1)
                    continue
                self.connections += 1
                return ws


async def wait_until_archived(
    services: ServiceProcesses, key: str, frames: int, timeout_s: float = 90
) -> dict:
    """The manifest once it is complete and lists `frames` frames (or the last seen)."""
    seen: dict = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while True:
                raw = await services.store.get(key)
                if raw is not None:
                    seen = orjson.loads(raw)
                    listed = sum(s["frames"] for s in seen["segments"])
                    if seen["status"] == "complete" and listed == frames:
                        return seen
                await asyncio.sleep(0.2)
    return seen


async def test_a_deploy_mid_gop_loses_no_frame(services: ServiceProcesses) -> None:
    """Eight seconds in, the task gets SIGTERM (it drains: 1012 to the bot, then flushes
    and exits); a fresh task with its own empty spool, on the same bucket, takes the bot's
    reconnect. One sender has a single key frame, the other one every 10 s: neither loses
    a frame, and each stream decodes in order from its first key frame to its last frame."""
    senders = [
        Sender(100, fps=15, seconds=14, keyframe_interval_s=None),
        Sender(101, fps=20, seconds=14, keyframe_interval_s=10),
    ]
    await asyncio.gather(*(asyncio.to_thread(sender.encode) for sender in senders))
    old = await services.start(task="task-a")
    serving: list[ServiceProcess] = [old]
    bot = ReconnectingBot(senders, lambda: serving[-1].url)
    sending = asyncio.create_task(bot.run())
    async with asyncio.timeout(30):  # six seconds of the meeting on the old task
        while any(bot.sent[s.participant_id] < 6 * s.fps for s in senders):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    serving.append(await services.start(task="task-b"))
    assert await old.stop() == 0
    async with asyncio.timeout(60):
        await sending
    new = serving[-1]
    assert bot.connections == 2
    for sender in senders:
        key = manifest_key(sender.participant_id)
        sent = bot.sent[sender.participant_id]
        assert sent == len(sender.units)
        manifest = await wait_until_archived(services, key, sent)
        archived = sum(s["frames"] for s in manifest["segments"])
        print(f"deploy: participant {sender.participant_id}: {archived} of {sent} frames archived")
        check = await check_stream(services.store, key, key_prefix="archive/")
        assert check.ok, check.problems
        assert [round(f.time_s, 4) for f in check.frames] == [
            round(relative, 4) for relative, _ in sender.units
        ]
        counters = check.manifest["counters"]
        assert counters.get("dropped_before_keyframe", 0) == 0
        assert counters["received"] == counters["archived"] == sent
        assert check.manifest["gaps"] == []
        continued = [s for s in check.manifest["segments"] if s["continues"]]
        if sender.keyframe_interval_s is None:
            assert continued, "the new task's segments continue the old task's GOP"
            playlist = await services.store.get(key.replace("manifest.json", PLAYLIST_NAME))
            assert playlist is not None
            assert b"#EXT-X-DISCONTINUITY\n" not in playlist
    continued_logs = [line for line in new.logs() if line["event"] == "stream_continued"]
    assert {line["participant"] for line in continued_logs} >= {"100"}


async def test_an_overlapping_reconnect_on_another_worker_keeps_all_forty_frames(
    services: ServiceProcesses,
) -> None:
    """Socket A: 20 frames. Socket B, on the other worker: 10 frames and a leave. A closes.
    B: 10 more. The one key frame went to A's worker; B's continues from the configuration
    of A's open segment."""
    service = await services.start(workers=2)
    await service.wait_for_workers(2)
    sender = Sender(100, fps=10, seconds=4, keyframe_interval_s=None)
    await asyncio.to_thread(sender.encode)
    start = datetime.now(UTC)

    async def send(ws: aiohttp.ClientWebSocketResponse, first: int, last: int) -> None:
        for relative, data in sender.units[first:last]:
            message = media_message(data, relative, start, "webcam", 100, BOT, RECORDING)
            await ws.send_str(orjson.dumps(message).decode())

    async with aiohttp.ClientSession() as session:
        old = await session.ws_connect(service.url)
        await send(old, 0, 20)
        worker_a = await stream_worker(service, count=1)
        new, extra = await connect_to_another_worker(session, service, worker_a)
        for ws in extra:
            await ws.close()
        await send(new, 20, 30)
        leave = participant_event("leave", 100, 3.0, start, BOT, RECORDING)
        await new.send_str(orjson.dumps(leave).decode())
        await old.close()
        await send(new, 30, 40)
        await new.close()
    manifest = await wait_until_archived(services, manifest_key(100), 40)
    check = await check_stream(services.store, manifest_key(100), key_prefix="archive/")
    assert check.ok, check.problems
    assert [round(f.time_s, 4) for f in check.frames] == [round(t, 4) for t, _ in sender.units]
    assert manifest["counters"]["received"] == 40
    assert manifest["counters"].get("dropped_before_keyframe", 0) == 0
    started = {line["pid"] for line in service.logs() if line["event"] == "stream_started"}
    assert len(started) == 2, "the two sockets were served by two workers"


async def stream_worker(service: ServiceProcess, count: int, timeout_s: float = 10) -> int:
    """The pid of the worker that started the `count`-th stream."""
    async with asyncio.timeout(timeout_s):
        while True:
            started = [line for line in service.logs() if line["event"] == "stream_started"]
            if len(started) >= count:
                return int(started[count - 1]["pid"])
            await asyncio.sleep(0.05)


async def connect_to_another_worker(
    session: aiohttp.ClientSession, service: ServiceProcess, taken: int, tries: int = 20
) -> tuple[aiohttp.ClientWebSocketResponse, list[aiohttp.ClientWebSocketResponse]]:
    """A connection that a worker other than `taken` accepted, and those it took to get
    one (each connection is known by the worker that logged it opening)."""
    extra = []
    for _ in range(tries):
        opened = len(connections_opened(service))
        ws = await session.ws_connect(service.url)
        async with asyncio.timeout(10):
            while len(connections_opened(service)) <= opened:  # noqa: ASYNC110 (a log file)
                await asyncio.sleep(0.02)
        if connections_opened(service)[-1]["pid"] != taken:
            return ws, extra
        extra.append(ws)
    raise AssertionError(f"{tries} connections all landed on worker {taken}")


def connections_opened(service: ServiceProcess) -> list[dict]:
    return [line for line in service.logs() if line["event"] == "connection_opened"]
