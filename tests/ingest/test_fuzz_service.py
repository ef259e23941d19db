"""Thousands of mutated real messages thrown at a running service while good streams run
beside them: no traceback, no error logged, every good frame archived, every manifest's
counters adding up, and the service alive at the end."""

from __future__ import annotations

import asyncio
import base64
import os
import random
from typing import Any

import aiohttp
import orjson
import pytest

from archiver.consumers.decode_check import check_stream
from archiver.ingest.server import STATE
from archiver.tools.simulator import audio_message, media_message, participant_event
from tests.conftest import RunningService, ServiceFactory
from tests.hostile import START, deep, dumps, h264_units, png_images, real_audio, speech_chunks
from tests.ingest.test_hostile_stream import (
    assert_alive,
    assert_clean,
    manifest_key,
    stream_level_bad,
)
from tests.invariants import assert_counters_add_up

MESSAGES = int(os.environ.get("FUZZ_MESSAGES", "3000"))
SEED = int(os.environ.get("FUZZ_SEED", "20260101"))
PER_CONNECTION = 500
ALONE, BESIDE, SPEAKING = 200, 201, 202
"""Good streams of recording rec-1: one on its own connection, one beside the fuzz, and a
participant's audio beside the fuzz too."""
FUZZ_BOT = "bot-fuzz"
ODD_IDS: list[Any] = ["x", "0", "9" * 128, "9" * 129, "-1", "../x", "", "a_b-c", 2**63 - 1, -1]
ABSURD = [1e300, -1e300, 1e12, -5.0, 2**63 - 1, -(2**63), 1.7976931348623157e308, 0, 5e-324]
TYPES: list[Any] = [None, True, 0, -1, 1.5, "", "x", [], [1, 2], {}, {"a": 1}]
KINDS = [
    *("json_flip", "payload_flip", "cut_key", "deep", "huge", "odd_id", "swap_type"),
    *("cut_json", "wrong_event", "buffer", "event", "binary", "good"),
]
FIELDS = [
    ("event",),
    ("data",),
    ("data", "data"),
    ("data", "data", "buffer"),
    ("data", "data", "timestamp"),
    ("data", "data", "timestamp", "relative"),
    ("data", "data", "timestamp", "absolute"),
    ("data", "data", "type"),
    ("data", "data", "participant"),
    ("data", "data", "participant", "id"),
    ("data", "data", "participant", "extra_data"),
    ("data", "bot"),
    ("data", "bot", "id"),
    ("data", "recording", "id"),
    ("data", "recording", "metadata"),
]


def put(message: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    parent: Any = message
    for key in path[:-1]:
        parent = parent.get(key) if isinstance(parent, dict) else None
    if isinstance(parent, dict):
        parent[path[-1]] = value


def flip(data: bytes, rng: random.Random, flips: int) -> bytes:
    mutable = bytearray(data)
    for _ in range(flips):
        mutable[rng.randrange(len(mutable))] ^= rng.randrange(1, 256)
    return bytes(mutable)


def fuzz_message(rng: random.Random) -> str | bytes:
    """One mutation of a real message of a fuzz recording (never rec-1: byte flips keep
    lengths, and no id of the fuzz recordings is as short as rec-1's)."""
    units = h264_units()
    relative, data = rng.choice(units)
    png = rng.random() < 0.2
    if png:
        data, relative = rng.choice(png_images()), rng.randrange(20) / 2
    audio = not png and rng.random() < 0.2
    if audio:
        relative, data = rng.choice(speech_chunks())
    ids = {"bot_id": FUZZ_BOT, "recording_id": f"rec-fuzz-{rng.randrange(2)}"}
    participant = 300 + rng.randrange(4)
    kind = rng.choice(KINDS)
    if kind == "event":
        event = participant_event(
            rng.choice(["join", "leave", "update", "speech_on"]),
            participant,
            relative,
            START,
            **ids,
        )
        put(event, rng.choice(FIELDS), rng.choice([*TYPES, *ABSURD]))
        return dumps(event).decode()
    if kind == "payload_flip":
        data = flip(data, rng, rng.randrange(1, 16))
    elif kind == "cut_key":
        data = units[0][1][: rng.randrange(1, len(units[0][1]))]
    if audio:
        message = audio_message(data, relative, START, participant, **ids)
    else:
        message = media_message(
            data,
            relative,
            START,
            rng.choice(["webcam", "screenshare"]),
            participant,
            event="video_separate_png.data" if png else "video_separate_h264.data",
            **ids,
        )
    if kind == "deep":
        put(message, rng.choice(FIELDS), deep(rng.choice([10, 63, 64, 65, 200, 255, 1000])))
    elif kind == "huge":
        put(message, rng.choice(FIELDS[4:7]), rng.choice(ABSURD))
    elif kind == "odd_id":
        put(message, rng.choice(FIELDS[9:14:2]), rng.choice(ODD_IDS))
    elif kind == "swap_type":
        put(message, rng.choice(FIELDS), rng.choice(TYPES))
    elif kind == "wrong_event":
        events = ["video_separate_png.data", "audio_separate_raw.data", "transcript.data", ""]
        put(message, ("event",), rng.choice(events))
    elif kind == "buffer":
        buffers = [
            b"",
            b"\x00\x00\x01",
            b"\x00\x00\x01\x09" * 2000,
            b"\x00\x00\x01\x67" * 300 + b"\x00\x00\x01\x65",
            os.urandom(rng.randrange(1, 512)),
            b"\x01" * rng.choice([1, 3, 641]),  # odd: not whole 16-bit samples
            bytes(16_000 * 2 * 3),  # three seconds of audio in one chunk
        ]
        put(message, ("data", "data", "buffer"), base64.b64encode(rng.choice(buffers)).decode())
    text = dumps(message)
    if kind == "json_flip":
        text = flip(text, rng, rng.randrange(1, 6))
    elif kind == "cut_json":
        text = text[: rng.randrange(len(text))]
    elif kind == "binary":
        return text
    return text.decode("utf-8", errors="replace")


async def send_good(
    running: RunningService,
    participant_id: int,
    ws: Any = None,
    started: asyncio.Event | None = None,
) -> list[float]:
    """A good stream, paced a little so that it runs the whole time the fuzz does; sets
    `started` once a few frames are out."""
    units = list(h264_units(seconds=3))
    async with aiohttp.ClientSession() as session:
        own = ws is None
        if own:
            ws = await session.ws_connect(running.url)
        for t, data in units:
            message = media_message(data, t, START, "webcam", participant_id, "bot-1", "rec-1")
            await ws.send_str(orjson.dumps(message).decode())
            if started is not None and t >= 0.5:
                started.set()
            await asyncio.sleep(0.05)
        if own:
            await ws.close()
    return [t for t, _ in units]


async def fuzz(running: RunningService, rng: random.Random) -> dict[str, int]:
    """Send every mutation, a fresh connection every `PER_CONNECTION` messages, with a good
    stream and a few detectably bad messages of its own on the first connection."""
    sent = {"messages": 0, "connections": 0, "closed_by_server": 0}
    units = list(h264_units(seconds=3))
    async with aiohttp.ClientSession() as session:
        beside = None
        while sent["messages"] < MESSAGES:
            ws = await session.ws_connect(running.url)
            sent["connections"] += 1
            if beside is None:
                for relative, pcm in speech_chunks():
                    await ws.send_str(orjson.dumps(real_audio(pcm, relative, SPEAKING)).decode())
                started = asyncio.Event()
                beside = asyncio.create_task(send_good(running, BESIDE, ws, started))
                await started.wait()  # after its key frame, the bad ones are counted as such
                for index in (7, 19):
                    for text in stream_level_bad(units, index, BESIDE).values():
                        await ws.send_str(text)
            for _ in range(PER_CONNECTION):
                if ws.closed:
                    sent["closed_by_server"] += 1
                    break
                message = fuzz_message(rng)
                if isinstance(message, bytes):
                    await ws.send_bytes(message)
                else:
                    await ws.send_str(message)
                sent["messages"] += 1
                if sent["messages"] % 50 == 0:
                    await asyncio.sleep(0)
            if sent["connections"] == 1:
                await beside
            await ws.close()
    return sent


async def assert_every_stream_ends(running: RunningService, within_s: float) -> None:
    """Once every connection has closed, every stream finishes without waiting to go idle."""
    state = running.app[STATE]
    deadline = asyncio.get_running_loop().time() + within_s
    while asyncio.get_running_loop().time() < deadline:
        running_streams = [str(s.id) for s in state.writers.streams.streams.values() if s.running]
        if not state.connections and not running_streams:
            break
        await asyncio.sleep(0.1)
    assert not state.connections
    assert not running_streams, f"{len(running_streams)} streams never ended: {running_streams[:5]}"
    await running.settle(timeout_s=10)


@pytest.mark.volume
@pytest.mark.slow
async def test_fuzzed_messages_beside_good_streams(
    service: ServiceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    # Idle streams end only long after the test: every stream must end when its sender goes.
    running = await service(idle_timeout_s=120)
    rng = random.Random(SEED)
    loop = asyncio.get_running_loop()
    started = loop.time()
    alone, sent = await asyncio.gather(send_good(running, ALONE), fuzz(running, rng))
    assert sent["messages"] >= MESSAGES
    await assert_every_stream_ends(running, within_s=15)
    await assert_alive(running.http)

    heard = (await running.json(manifest_key(SPEAKING, "flac", "audio")))["counters"]
    assert heard["received"] == heard["archived"] == len(speech_chunks())
    ticks = [round(t * 90_000) for t in alone]
    for participant_id in (ALONE, BESIDE):
        check = await check_stream(running.store, manifest_key(participant_id), "archive/")
        assert check.ok, (participant_id, check.problems)
        assert [round(f.time_s * 90_000) for f in check.frames] == ticks
        assert_counters_add_up(check.manifest)
    beside = (await running.json(manifest_key(BESIDE)))["counters"]
    assert beside["invalid_timestamp"] == 6
    assert beside["dropped_invalid"] == 12

    manifests = [
        key.removeprefix("archive/")
        for key in running.object_keys()
        if key.endswith(("/h264/manifest.json", "/png/manifest.json", "/flac/manifest.json"))
    ]
    assert len(manifests) > 2
    for key in manifests:
        manifest = await running.json(key)
        assert manifest["status"] == "complete", key
        assert_counters_add_up(manifest)

    await running.runner.cleanup()
    assert_clean(capsys.readouterr().out)
    assert loop.time() - started < 30 or MESSAGES > 3000


def test_the_mutations_are_deterministic_for_a_seed() -> None:
    first = [fuzz_message(random.Random(7)) for _ in range(3)]
    assert first == [fuzz_message(random.Random(7)) for _ in range(3)]
