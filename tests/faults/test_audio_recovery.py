"""A worker killed while three participants are talking: what was journaled is recovered
into their audio, sample for sample at its place, and the bot's reconnection continues it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import UTC, datetime

import aiohttp
import numpy as np
import orjson

from archiver.consumers.reader import Archive, StreamInfo
from archiver.layout import RecordingId, StreamId
from archiver.tools.simulator import audio_message
from tests.faults.conftest import ServiceProcesses
from tests.speech import RATE, Chunk, meeting_audio, speaker

SPEAKERS = (100, 101, 102)


async def send_paced(
    ws: aiohttp.ClientWebSocketResponse, recording: RecordingId, sent: list[tuple[int, Chunk]]
) -> None:
    """As a bot sends: each chunk at its time, the first at once."""
    start = datetime.now(UTC)
    began, first = time.monotonic(), sent[0][1].relative_s
    for participant_id, chunk in sent:
        await asyncio.sleep(max(0, began + chunk.relative_s - first - time.monotonic()))
        message = audio_message(
            chunk.pcm,
            chunk.relative_s,
            start,
            participant_id,
            recording.bot_id,
            recording.recording_id,
        )
        await ws.send_str(orjson.dumps(message).decode())


async def test_a_worker_killed_mid_utterance_keeps_what_it_journaled_and_the_stream_goes_on(
    services: ServiceProcesses,
) -> None:
    service = await services.start(audio_segment_s=30, idle_timeout_s=3)
    recording = RecordingId("bot-audio", "rec-kill")
    pcm = {p: speaker(p, 8.0) for p in SPEAKERS}
    sent = meeting_audio(pcm, start_s=2.0, jitter_s=0.005)
    before = [item for item in sent if item[1].true_start < 4 * RATE]
    after = [item for item in sent if item[1].true_start >= 4 * RATE]

    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(service.url) as ws:
            await send_paced(ws, recording, before)
            await asyncio.sleep(0.1)  # mid-utterance: segments open, their chunks journaled
            killed = service.worker_pid()
            os.kill(killed, signal.SIGKILL)
            await ws.receive()
        await service.wait_healthy()
        assert service.worker_pid() != killed
        async with session.ws_connect(service.url) as ws:
            await send_paced(ws, recording, after)

    async with Archive(services.store) as archive:
        for participant_id, spoken in pcm.items():
            stream_id = StreamId(recording, str(participant_id), "audio", "flac")
            stream = StreamInfo(
                recording, stream_id.participant_id, "audio", "flac", stream_id.manifest_key
            )
            manifest = await wait_until_complete(archive, stream)
            segments = manifest["segments"]
            assert segments[0]["recovered"]
            assert not segments[-1]["recovered"]
            assert manifest["recovered_ranges"]
            first = segments[0]["start_sample"]
            expected = np.frombuffer(spoken, "<i2")
            stored = 0
            async for at, samples in archive.audio_blocks(stream):
                # Every sample stored is the one sent for that place on the timeline.
                assert np.array_equal(samples, expected[at - first : at - first + len(samples)])
                stored += len(samples)
            lost_s = (len(expected) - stored) / RATE
            assert 0 <= lost_s <= 0.5, f"participant {participant_id}: {lost_s:.3f} s lost"
    recovering = [line for line in service.logs() if line["event"] == "recovering"]
    assert recovering
    assert recovering[0]["replayed_segments"] >= 3


async def wait_until_complete(archive: Archive, stream: StreamInfo, timeout_s: float = 60) -> dict:
    async with asyncio.timeout(timeout_s):
        while True:
            document = await archive.document(stream.manifest_key)
            if document is not None and document["status"] == "complete":
                return document
            await asyncio.sleep(0.2)
