"""Real speech for audio tests: espeak-ng's voice, as a Recall bot sends a participant's
audio (16 kHz, mono, 16-bit signed little-endian PCM), and the chunks it comes in."""

from __future__ import annotations

import functools
import io
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import aiohttp
import av
import numpy as np
import orjson

from archiver.tools.simulator import audio_message

RATE = 16_000
SENTENCES = (
    "Good morning everyone, let us look at the numbers for this quarter.",
    "I think the launch went well, but support tickets doubled in the first week.",
    "Can we move the review to Thursday? I am travelling on Wednesday.",
)


@functools.cache
def speech(text: str, voice: str = "en") -> bytes:
    """`text` spoken by espeak-ng, resampled to the bot's PCM."""
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "--stdout", text], check=True, capture_output=True
    ).stdout
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    parts = []
    with av.open(io.BytesIO(wav)) as container:
        for frame in container.decode(audio=0):
            parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    return np.concatenate(parts).astype("<i2").tobytes()


def speaker(number: int, seconds: float) -> bytes:
    """About `seconds` of one speaker talking: sentences in turn, in a voice of its own."""
    voice = ("en", "en-us", "en-gb-x-rp")[number % 3]
    pcm = b""
    turn = number
    while len(pcm) < seconds * RATE * 2:
        pcm += speech(SENTENCES[turn % len(SENTENCES)], voice) + bytes(RATE // 2 * 2)
        turn += 1
    return pcm[: int(seconds * RATE) * 2]


@dataclass(frozen=True, slots=True)
class Chunk:
    relative_s: float
    pcm: bytes
    true_start: int
    """The sample it truly starts at: what its timestamp says, before jitter and drift."""


def chunks(
    pcm: bytes,
    start_s: float = 0.0,
    jitter_s: float = 0.0,
    ppm: float = 0.0,
    seed: int = 0,
    sizes: tuple[int, ...] = (160, 320, 480, 640, 1024, 1600),
) -> Iterator[Chunk]:
    """`pcm` cut into chunks of varying sizes (samples), each stamped with its start plus
    jitter; a sender clock `ppm` off stretches the timestamps."""
    rng = random.Random(seed)
    position = 0
    total = len(pcm) // 2
    while position < total:
        size = min(rng.choice(sizes), total - position)
        stamp = start_s + position / RATE * (1 + ppm / 1e6) + rng.uniform(-jitter_s, jitter_s)
        yield Chunk(round(max(0.0, stamp), 6), pcm[position * 2 : (position + size) * 2], position)
        position += size


def meeting_audio(
    speakers: dict[int, bytes], start_s: float, jitter_s: float, seed: int = 0
) -> list[tuple[int, Chunk]]:
    """Every speaker's chunks, interleaved as one bot sends them: each in the order it was
    recorded (its timestamp's jitter does not reorder it)."""
    sent = [
        (participant_id, chunk)
        for participant_id, pcm in speakers.items()
        for chunk in chunks(pcm, start_s, jitter_s, seed=seed + participant_id)
    ]
    return sorted(sent, key=lambda item: item[1].true_start)


async def send_audio(
    url: str,
    bot_id: str,
    recording_id: str,
    sent: list[tuple[int, Chunk]],
    wallclock_start: datetime,
) -> None:
    """Send chunks over one websocket of their own, then close it."""
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        for participant_id, chunk in sent:
            message = audio_message(
                chunk.pcm, chunk.relative_s, wallclock_start, participant_id, bot_id, recording_id
            )
            await ws.send_str(orjson.dumps(message).decode())
