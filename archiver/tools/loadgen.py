"""Many simulated bots from one process: a load generator for the service or any receiver.

The video is encoded once, before the clock starts (one x264 clip per run, WebRTC-like, see
`archiver.tools.simulator`), and its access units are base64-encoded once; so is a clip of
participants' audio (`encode_audio_clip`: voice-like PCM in chunks, as
`audio_separate_raw.data` sends it), for loads of audio instead of video. Every bot and every
participant replays that clip under its own ids: a message is a few string joins, so one
process can drive many bots. Bots start a fraction of a frame apart, as real bots do.

In real time each message has a due time; how late its send finished is its *lag* (a
receiver that reads slowly makes the socket's buffer fill and the sends wait). With `fast`
each bot sends as fast as the receiver reads.

A load longer than its clip replays the clip back to back, timestamps running on: a long
meeting costs one short clip's encoding. Each replay starts with the clip's key frame.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import numpy as np
import orjson

from archiver.tools.simulator import (
    SimulatedStream,
    Size,
    audio_message,
    close_like_a_bot,
    encode_stream,
    envelope,
    participant,
    participant_event,
    watch_for_close,
)

_BUFFER = "@@BUFFER@@"
_RELATIVE = "@@RELATIVE@@"
_ABSOLUTE = "@@ABSOLUTE@@"


@dataclass(frozen=True, slots=True)
class Clip:
    """The access units (or audio chunks) every stream replays: (relative seconds, base64,
    decoded size), `fps` of them a second."""

    units: list[tuple[float, str, int]]
    fps: float
    size: Size
    audio: bool = False
    """Chunks of a participant's PCM, sent as `audio_separate_raw.data`."""

    def frames_for(self, seconds: float) -> int:
        """Frames a stream of `seconds` sends: the whole clip at least, replayed as needed."""
        return max(len(self.units), round(seconds * self.fps))

    def frame(self, index: int) -> tuple[float, str]:
        """The `index`th frame sent: its relative time and base64 access unit."""
        replay, number = divmod(index, len(self.units))
        relative, buffer, _ = self.units[number]
        return replay * len(self.units) / self.fps + relative, buffer


def encode_clip(seconds: float, fps: float, size: Size) -> Clip:
    """Encode `seconds` of video once: a key frame at the start only, like WebRTC."""
    plan = SimulatedStream(0, "webcam", [(0.0, size)])
    units = [
        (relative, base64.b64encode(data).decode("ascii"), len(data))
        for relative, data, _ in encode_stream(plan, seconds, fps, None)
    ]
    return Clip(units, fps, size)


def encode_audio_clip(seconds: float, chunk_s: float = 0.02) -> Clip:
    """`seconds` of voice-like 16 kHz PCM (a harmonic tone at a speaking pitch, syllables
    of it, breath noise between), in chunks of `chunk_s`."""
    rate = 16_000
    rng = np.random.default_rng(16_000)
    times = np.arange(round(seconds * rate)) / rate
    pitch = 2 * np.pi * (120 + 15 * np.sin(2 * np.pi * 0.7 * times)) * times
    voiced = sum(np.sin(k * pitch) / k for k in range(1, 9))
    syllables = np.clip(np.sin(2 * np.pi * 3.5 * times), 0, None)
    signal = 6000 * voiced * syllables + rng.normal(0, 80, len(times))
    pcm = np.clip(signal, -32768, 32767).astype("<i2").tobytes()
    size = round(chunk_s * rate) * 2
    units = [
        (round(offset / 2 / rate, 6), base64.b64encode(pcm[offset : offset + size]).decode(), size)
        for offset in range(0, len(pcm) - size + 1, size)
    ]
    return Clip(units, 1 / chunk_s, (0, 0), audio=True)


@dataclass(slots=True)
class BotReport:
    bot_id: str
    recording_id: str
    participant_ids: list[int]
    messages: int = 0
    frames: int = 0
    close_code: int | None = None
    send_times: list[list[float]] = field(default_factory=list)
    """Per participant, the wall-clock time (`time.time()`) each frame's send finished."""


@dataclass(slots=True)
class LoadReport:
    """What the generator sent: totals, rate, and how far behind real time sends fell."""

    bots: list[BotReport]
    realtime: bool
    expected_frames: int = 0
    messages: int = 0
    frames: int = 0
    bytes: int = 0
    seconds: float = 0.0
    lags_s: list[float] = field(default_factory=list)
    started_at: float = 0.0
    """Wall clock (`time.time()`) when the first bot started sending."""

    def lag_percentile(self, fraction: float) -> float | None:
        if not self.lags_s:
            return None
        ordered = sorted(self.lags_s)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        p50, p99 = self.lag_percentile(0.5), self.lag_percentile(0.99)
        return {
            "bots": len(self.bots),
            "realtime": self.realtime,
            "messages": self.messages,
            "frames": self.frames,
            "frames_expected": self.expected_frames,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "messages_per_s": round(self.messages / self.seconds, 1) if self.seconds else None,
            "send_lag_p50_ms": None if p50 is None else round(p50 * 1000, 2),
            "send_lag_p99_ms": None if p99 is None else round(p99 * 1000, 2),
            "send_lag_max_ms": round(max(self.lags_s) * 1000, 2) if self.lags_s else None,
            "closed_by_server": sum(bot.close_code is not None for bot in self.bots),
            "recordings": [
                {"bot": bot.bot_id, "recording": bot.recording_id, "frames": bot.frames}
                for bot in self.bots
            ],
        }


@dataclass(slots=True)
class Load:
    """What to send: `bots` connections, each with `participants` webcam streams of
    `seconds` of video (the clip replayed where it is shorter)."""

    url: str
    bots: int = 1
    participants: int = 16
    seconds: float = 20.0
    fps: float = 30.0
    size: Size = (640, 360)
    realtime: bool = True
    participant_events: bool = True
    record_send_times: bool = False
    join_interval_s: float = 0.0
    """How far apart the bots connect and start: a fleet's bots join meetings at different
    times (0: all at once, each a fraction of a frame after the last)."""
    recordings: list[tuple[str, str]] | None = None
    """Each bot's (bot id, recording id); None: new ones. The same ids as another load's
    send that load's recordings something more on connections of their own (their audio,
    as a second realtime endpoint does)."""


def _templates(bot_id: str, recording_id: str, participant_id: int, audio: bool) -> tuple[str, ...]:
    """One participant's message cut into the parts around its buffer and timestamps."""
    if audio:
        message = audio_message(b"", 0.0, datetime.now(UTC), participant_id, bot_id, recording_id)
        inner = message["data"]["data"]
        inner["buffer"] = _BUFFER
        inner["timestamp"] = {"relative": _RELATIVE, "absolute": _ABSOLUTE}
    else:
        inner = {
            "buffer": _BUFFER,
            "timestamp": {"relative": _RELATIVE, "absolute": _ABSOLUTE},
            "type": "webcam",
            "participant": participant(participant_id),
        }
        message = envelope("video_separate_h264.data", inner, bot_id, recording_id)
    text = orjson.dumps(message).decode()
    head, _, rest = text.partition(_BUFFER)
    middle, _, rest = rest.partition(f'"{_RELATIVE}"')
    between, _, tail = rest.partition(_ABSOLUTE)
    return head, middle, between, tail


async def _run_bot(
    load: Load,
    clip: Clip,
    absolutes: list[str],
    report: BotReport,
    totals: LoadReport,
    start: float,
    wallclock_start: datetime,
) -> None:
    templates = [
        _templates(report.bot_id, report.recording_id, p, clip.audio)
        for p in report.participant_ids
    ]
    report.send_times = [[] for _ in report.participant_ids]
    ids = {"bot_id": report.bot_id, "recording_id": report.recording_id}
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start - loop.time()))
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(load.url, max_msg_size=0, compress=0) as ws,
    ):
        closed = asyncio.Event()
        watcher = asyncio.create_task(watch_for_close(ws, closed))
        try:
            if load.participant_events:
                for pid in report.participant_ids:
                    event = participant_event("join", pid, 0.0, wallclock_start, **ids)
                    await ws.send_str(orjson.dumps(event).decode())
                    report.messages += 1
            for index, absolute in enumerate(absolutes):
                relative, buffer = clip.frame(index)
                if load.realtime:
                    delay = start + relative - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                relative_text = repr(relative)
                for number, (head, middle, between, tail) in enumerate(templates):
                    if closed.is_set():
                        return
                    text = head + buffer + middle + relative_text + between
                    text += absolute + tail
                    await ws.send_str(text)
                    done = loop.time()
                    if load.realtime:
                        totals.lags_s.append(max(0.0, done - (start + relative)))
                    if load.record_send_times:
                        report.send_times[number].append(time.time())
                    report.messages += 1
                    report.frames += 1
                    totals.bytes += len(text)
            if load.participant_events:
                end = clip.frame(len(absolutes) - 1)[0] if absolutes else 0.0
                for pid in report.participant_ids:
                    event = participant_event("leave", pid, end, wallclock_start, **ids)
                    await ws.send_str(orjson.dumps(event).decode())
                    report.messages += 1
        except ConnectionResetError:
            return
        finally:
            report.close_code = await close_like_a_bot(ws, watcher)


async def run_load(load: Load, clip: Clip | None = None) -> LoadReport:
    """Connect every bot and send the clip through each; return what was sent."""
    if clip is None:
        loop = asyncio.get_running_loop()
        clip = await loop.run_in_executor(None, encode_clip, load.seconds, load.fps, load.size)
    wallclock_start = datetime.now(UTC)
    frames = clip.frames_for(load.seconds) if clip.units else 0
    absolutes = [
        (wallclock_start + timedelta(seconds=clip.frame(index)[0])).isoformat()
        for index in range(frames)
    ]
    recordings = load.recordings or [
        (str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(load.bots)
    ]
    reports = [
        BotReport(bot_id, recording_id, list(range(100, 100 + load.participants)))
        for bot_id, recording_id in recordings[: load.bots]
    ]
    totals = LoadReport(reports, load.realtime, len(reports) * load.participants * frames)
    loop = asyncio.get_running_loop()
    began = loop.time()
    totals.started_at = time.time()
    # Real bots are not in step: each starts a fraction of a frame after the last, and
    # `join_interval_s` later still.
    stagger = load.join_interval_s + 1.0 / clip.fps / max(1, load.bots)
    await asyncio.gather(
        *(
            _run_bot(load, clip, absolutes, report, totals, began + n * stagger, wallclock_start)
            for n, report in enumerate(reports)
        )
    )
    totals.seconds = loop.time() - began
    totals.messages = sum(bot.messages for bot in reports)
    totals.frames = sum(bot.frames for bot in reports)
    return totals
