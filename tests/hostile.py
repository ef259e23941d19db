"""Real media and real messages to break: what the property and fuzz tests start from."""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from typing import Any

import orjson

from archiver.tools.simulator import (
    SimulatedStream,
    audio_message,
    encode_png_stream,
    encode_stream,
    media_message,
)
from tests.speech import chunks, speaker

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
_DEEP = re.compile(r'"@@deep(\d+)@@"')


@functools.cache
def h264_units(
    width: int = 160, height: int = 120, seconds: float = 1.0, fps: float = 10.0
) -> tuple[tuple[float, bytes], ...]:
    """One key frame then P frames from x264 set up like WebRTC: (relative time, unit)."""
    plan = SimulatedStream(100, "webcam", [(0.0, (width, height))])
    return tuple((t, data) for t, data, _ in encode_stream(plan, seconds, fps, None))


@functools.cache
def png_images(count: int = 4, width: int = 64, height: int = 48) -> tuple[bytes, ...]:
    """Distinct PNGs of one size."""
    plan = SimulatedStream(100, "webcam", [(0.0, (width, height))], "png")
    return tuple(data for _, data, _ in encode_png_stream(plan, count / 2, 2.0))


@functools.cache
def speech_chunks(seconds: float = 2.0) -> tuple[tuple[float, bytes], ...]:
    """Real speech as a bot sends it: (relative time, PCM chunk)."""
    return tuple((c.relative_s, c.pcm) for c in chunks(speaker(1, seconds), seed=1))


def real_audio(pcm: bytes, relative_s: float = 0.5, participant_id: int = 100) -> dict[str, Any]:
    return audio_message(pcm, relative_s, START, participant_id, "bot-1", "rec-1")


def real_media(
    data: bytes,
    relative_s: float = 0.5,
    participant_id: int = 100,
    event: str = "video_separate_h264.data",
) -> dict[str, Any]:
    return media_message(data, relative_s, START, "webcam", participant_id, "bot-1", "rec-1", event)


def deep(levels: int) -> str:
    """A placeholder that `dumps` turns into arrays nested `levels` deep: orjson itself
    refuses to write more than 254 levels."""
    return f"@@deep{levels}@@"


def dumps(message: object) -> bytes:
    """orjson, with every `deep(n)` placeholder written out as n nested arrays."""
    text = orjson.dumps(message).decode()
    return _DEEP.sub(lambda m: "[" * int(m[1]) + "0" + "]" * int(m[1]), text).encode()
