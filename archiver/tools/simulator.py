"""A fake Recall bot: synthetic moving video, encoded like WebRTC, sent in Recall's format.

x264 is set up the way a browser's WebRTC encoder behaves: constrained baseline, no
B-frames, SPS/PPS in-band before every IDR, and key frames only when asked for (at the
start, on a resolution change, or at an optional interval), so a stream may have one.
PNG streams send one PNG per frame, as Recall does (640x360 at 2 fps).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import aiohttp
import av
import orjson

from archiver.ingest.messages import MEDIA_EVENTS
from archiver.layout import MediaFormat, VideoType

_TIME_BASE = Fraction(1, 90_000)
_EVENT_OF_FORMAT = {media_format: event for event, media_format in MEDIA_EVENTS.items()}
PNG_SIZE = (640, 360)
PNG_FPS = 2.0
Size = tuple[int, int]


@dataclass(frozen=True, slots=True)
class SentFrame:
    """One access unit or PNG the simulator sent, for comparison with the archive."""

    relative_s: float
    keyframe: bool
    width: int
    height: int
    sha256: str = ""


@dataclass(slots=True)
class SimulatedStream:
    participant_id: int
    video_type: VideoType
    sizes: list[tuple[float, Size]]
    """(from second, size) pairs: the picture size changes at each `from second`."""
    media_format: MediaFormat = "h264"
    sent: list[SentFrame] = field(default_factory=list)


@dataclass(slots=True)
class Simulation:
    """A simulated meeting: what to send, and afterwards what was sent."""

    url: str
    participants: int = 2
    seconds: float = 10.0
    fps: float = 15.0
    size: Size = (320, 240)
    screenshare: bool = False
    resize_at_s: float | None = None
    resize_to: Size = (480, 272)
    keyframe_interval_s: float | None = None
    realtime: bool = False
    start_relative_s: float = 0.0
    bot_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    recording_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    format: MediaFormat = "h264"
    first_participant_id: int = 100
    """Participants are numbered from here: two simulations of one recording stay apart."""
    participant_events: bool = True
    streams: list[SimulatedStream] = field(default_factory=list)
    close_code: int | None = None
    """The close code the service sent, when it closed the connection first (a bot stops
    sending once it has seen the close frame, and reconnects)."""
    wallclock_start: datetime | None = None
    """The wall clock of relative time 0, once sent: what the bot's other connections (its
    audio) put in their absolute timestamps."""

    def plan(self) -> list[SimulatedStream]:
        sizes = [(0.0, self.size)]
        if self.resize_at_s is not None:
            sizes.append((self.resize_at_s, self.resize_to))
        types: list[VideoType] = ["webcam", "screenshare"] if self.screenshare else ["webcam"]
        self.streams = [
            SimulatedStream(self.first_participant_id + n, video_type, list(sizes), self.format)
            for n in range(self.participants)
            for video_type in types
        ]
        return self.streams


def participant(participant_id: int) -> dict[str, Any]:
    return {
        "id": participant_id,
        "name": f"Participant {participant_id}",
        "is_host": participant_id == 100,
        "platform": "desktop",
        "extra_data": {},
        "email": None,
    }


def envelope(
    event: str,
    inner: dict[str, Any],
    bot_id: str,
    recording_id: str,
) -> dict[str, Any]:
    """Wrap `inner` the way a Recall bot does, with ids and customer metadata."""
    return {
        "event": event,
        "data": {
            "data": inner,
            "realtime_endpoint": {"id": "rt-1", "metadata": {}},
            "video_separate": {"id": "vs-1", "metadata": {}},
            "recording": {"id": recording_id, "metadata": {"ticket": "T-42"}},
            "bot": {"id": bot_id, "metadata": {"team": "sales"}},
        },
    }


def media_message(
    buffer: bytes,
    relative_s: float,
    wallclock_start: datetime,
    video_type: VideoType,
    participant_id: int,
    bot_id: str,
    recording_id: str,
    event: str = "video_separate_h264.data",
) -> dict[str, Any]:
    absolute = wallclock_start + timedelta(seconds=relative_s)
    inner = {
        "buffer": base64.b64encode(buffer).decode("ascii"),
        "timestamp": {"relative": relative_s, "absolute": absolute.isoformat()},
        "type": video_type,
        "participant": participant(participant_id),
    }
    return envelope(event, inner, bot_id, recording_id)


def audio_message(
    pcm: bytes,
    relative_s: float,
    wallclock_start: datetime,
    participant_id: int,
    bot_id: str,
    recording_id: str,
) -> dict[str, Any]:
    """One participant's chunk of 16 kHz mono PCM, as `audio_separate_raw.data` sends it."""
    absolute = wallclock_start + timedelta(seconds=relative_s)
    inner = {
        "buffer": base64.b64encode(pcm).decode("ascii"),
        "timestamp": {"relative": relative_s, "absolute": absolute.isoformat()},
        "participant": participant(participant_id),
    }
    message = envelope("audio_separate_raw.data", inner, bot_id, recording_id)
    data = message["data"]
    del data["video_separate"]
    data["audio_separate"] = {"id": "as-1", "metadata": {}}
    return message


def participant_event(
    event: str,
    participant_id: int,
    relative_s: float,
    wallclock_start: datetime,
    bot_id: str,
    recording_id: str,
) -> dict[str, Any]:
    absolute = wallclock_start + timedelta(seconds=relative_s)
    inner = {
        "participant": participant(participant_id),
        "timestamp": {"relative": relative_s, "absolute": absolute.isoformat()},
        "data": None,
    }
    return envelope(f"participant_events.{event}", inner, bot_id, recording_id)


def encode_stream(
    plan: SimulatedStream,
    seconds: float,
    fps: float,
    keyframe_interval_s: float | None,
    start_relative_s: float = 0.0,
) -> Iterator[tuple[float, bytes, SentFrame]]:
    """Yield (relative time, access unit, what it is) for one stream, in order."""
    count = int(seconds * fps)
    source = av.open(f"testsrc2=size=1280x720:rate={fps}", format="lavfi")
    pictures = source.decode(video=0)
    encoder: av.VideoCodecContext | None = None
    size: Size | None = None
    last_key = -1e9
    try:
        for index in range(count):
            at = index / fps
            wanted = [s for start, s in plan.sizes if start <= at][-1]
            force_key = encoder is None or wanted != size
            if keyframe_interval_s is not None and at - last_key >= keyframe_interval_s:
                force_key = True
            if wanted != size:
                if encoder is not None and size is not None:
                    yield from _drain(encoder, None, start_relative_s, size)
                encoder, size = _encoder(wanted, fps), wanted
            assert encoder is not None
            assert size is not None
            frame = next(pictures).reformat(width=size[0], height=size[1], format="yuv420p")
            frame.pts = round(at * 90_000)
            frame.time_base = _TIME_BASE
            frame.pict_type = (
                av.video.frame.PictureType.I if force_key else av.video.frame.PictureType.NONE
            )
            if force_key:
                last_key = at
            yield from _drain(encoder, frame, start_relative_s, size)
        if encoder is not None and size is not None:
            yield from _drain(encoder, None, start_relative_s, size)
    finally:
        source.close()


def encode_png_stream(
    plan: SimulatedStream,
    seconds: float,
    fps: float,
    start_relative_s: float = 0.0,
) -> Iterator[tuple[float, bytes, SentFrame]]:
    """Yield (relative time, PNG, what it is) for one stream, in order: one image per frame."""
    count = int(seconds * fps)
    source = av.open(f"testsrc2=size=1280x720:rate={fps}", format="lavfi")
    pictures = source.decode(video=0)
    encoder: av.VideoCodecContext | None = None
    size: Size | None = None
    try:
        for index in range(count):
            at = index / fps
            wanted = [s for start, s in plan.sizes if start <= at][-1]
            if wanted != size:
                encoder = av.CodecContext.create("png", "w")
                assert isinstance(encoder, av.VideoCodecContext)
                encoder.width, encoder.height = wanted
                encoder.pix_fmt = "rgb24"
                encoder.time_base = _TIME_BASE
                size = wanted
            assert encoder is not None
            frame = next(pictures).reformat(width=wanted[0], height=wanted[1], format="rgb24")
            frame.pts = round(at * 90_000)
            frame.time_base = _TIME_BASE
            relative = round(start_relative_s + at, 6)
            for packet in encoder.encode(frame):
                data = bytes(packet)
                sent = SentFrame(relative, True, *wanted, hashlib.sha256(data).hexdigest())
                yield relative, data, sent
    finally:
        source.close()


def _encoder(size: Size, fps: float) -> av.VideoCodecContext:
    encoder = av.CodecContext.create("libx264", "w")
    assert isinstance(encoder, av.VideoCodecContext)
    encoder.width, encoder.height = size
    encoder.pix_fmt = "yuv420p"
    encoder.time_base = _TIME_BASE
    encoder.framerate = Fraction(fps).limit_denominator(1000)
    encoder.options = {
        "preset": "ultrafast",
        "tune": "zerolatency",
        "profile": "baseline",
        "level": "3.1",
        "x264-params": "keyint=infinite:scenecut=0:bframes=0:repeat-headers=1:forced-idr=1",
    }
    return encoder


def _drain(
    encoder: av.VideoCodecContext, frame: av.VideoFrame | None, offset: float, size: Size
) -> Iterator[tuple[float, bytes, SentFrame]]:
    for packet in encoder.encode(frame):
        assert packet.pts is not None
        relative = round(offset + packet.pts / 90_000, 6)
        data = bytes(packet)
        sha256 = hashlib.sha256(data).hexdigest()
        yield relative, data, SentFrame(relative, packet.is_keyframe, *size, sha256)


async def run_simulation(simulation: Simulation) -> Simulation:
    """Send the whole simulated meeting over one websocket; return it with `sent` filled."""
    streams = simulation.plan()
    wallclock_start = datetime.now(UTC) - timedelta(seconds=simulation.start_relative_s)
    simulation.wallclock_start = wallclock_start
    loop = asyncio.get_running_loop()

    def encode_all() -> list[tuple[float, int, bytes, SentFrame]]:
        timeline = []
        for number, stream in enumerate(streams):
            if stream.media_format == "png":
                frames = encode_png_stream(
                    stream, simulation.seconds, simulation.fps, simulation.start_relative_s
                )
            else:
                frames = encode_stream(
                    stream,
                    simulation.seconds,
                    simulation.fps,
                    simulation.keyframe_interval_s,
                    simulation.start_relative_s,
                )
            for relative, data, frame in frames:
                timeline.append((relative, number, data, frame))
        timeline.sort(key=lambda item: (item[0], item[1]))
        return timeline

    timeline = await loop.run_in_executor(None, encode_all)
    ids = {"bot_id": simulation.bot_id, "recording_id": simulation.recording_id}
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(simulation.url, max_msg_size=0) as ws,
    ):
        if simulation.participant_events:
            for pid in sorted({s.participant_id for s in streams}):
                await ws.send_str(
                    orjson.dumps(
                        participant_event(
                            "join", pid, simulation.start_relative_s, wallclock_start, **ids
                        )
                    ).decode()
                )
        closed = asyncio.Event()
        watcher = asyncio.create_task(watch_for_close(ws, closed))
        try:
            await _send_timeline(simulation, streams, timeline, ws, closed, wallclock_start)
        finally:
            simulation.close_code = await close_like_a_bot(ws, watcher)
    return simulation


async def close_like_a_bot(
    ws: aiohttp.ClientWebSocketResponse, watcher: asyncio.Task[int | None]
) -> int | None:
    """End the connection as a well-behaved bot does: send the close frame, keep reading
    until the service's close reply (or aiohttp's close timeout), then let the socket go.
    Everything written before the close frame reaches the service; tearing the socket down
    at once could reset it with frames still unread. Returns the close code the service
    sent when it closed first (None when this side closed or the connection just broke)."""
    if not watcher.done():
        # aiohttp's close wakes the watcher's pending receive, then reads up to the reply.
        await ws.close()
    try:
        return await watcher
    except (aiohttp.ClientError, ConnectionError, RuntimeError):
        return None


async def watch_for_close(ws: aiohttp.ClientWebSocketResponse, closed: asyncio.Event) -> int | None:
    """Like a bot: read what the service sends until it closes; set `closed` then, and
    return the close code it sent (None when this side began the close, or the connection
    just broke)."""
    while True:
        message = await ws.receive()
        if message.type is aiohttp.WSMsgType.CLOSE:
            closed.set()
            return int(message.data)
        if message.type in (
            aiohttp.WSMsgType.CLOSING,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR,
        ):
            closed.set()
            return None


async def _send_timeline(
    simulation: Simulation,
    streams: list[SimulatedStream],
    timeline: list[tuple[float, int, bytes, SentFrame]],
    ws: aiohttp.ClientWebSocketResponse,
    closed: asyncio.Event,
    wallclock_start: datetime,
) -> None:
    """Send in time order until done or until the service closed the connection: a frame
    counts as sent only when it went out before the bot saw the close frame."""
    loop = asyncio.get_running_loop()
    ids = {"bot_id": simulation.bot_id, "recording_id": simulation.recording_id}
    try:
        started = loop.time()
        for relative, number, data, frame in timeline:
            if closed.is_set():
                return
            if simulation.realtime:
                delay = (relative - simulation.start_relative_s) - (loop.time() - started)
                if delay > 0:
                    await asyncio.sleep(delay)
            stream = streams[number]
            message = media_message(
                data,
                relative,
                wallclock_start,
                stream.video_type,
                stream.participant_id,
                event=_EVENT_OF_FORMAT[stream.media_format],
                **ids,
            )
            if closed.is_set():
                return
            await ws.send_str(orjson.dumps(message).decode())
            stream.sent.append(frame)
        if simulation.participant_events:
            end = simulation.start_relative_s + simulation.seconds
            for pid in sorted({s.participant_id for s in streams}):
                await ws.send_str(
                    orjson.dumps(
                        participant_event("leave", pid, end, wallclock_start, **ids)
                    ).decode()
                )
    except ConnectionResetError:
        return  # Closed while sending: the frame did not go out.
