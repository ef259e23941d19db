"""End to end: each participant's audio through the service into S3, read back and decoded."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aiohttp
import m3u8
import numpy as np
import orjson

from archiver.consumers.reader import Archive, StreamInfo
from archiver.layout import RecordingId, StreamId
from archiver.store import S3Store
from archiver.tools.simulator import Simulation, audio_message, run_simulation
from tests.conftest import RunningService, ServiceFactory
from tests.invariants import assert_counters_add_up
from tests.speech import chunks, meeting_audio, send_audio, speaker

START = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
SPEAKERS = (100, 101, 102)


def audio_stream(sim: Simulation, participant_id: int) -> StreamInfo:
    stream = StreamId(
        RecordingId(sim.bot_id, sim.recording_id), str(participant_id), "audio", "flac"
    )
    return StreamInfo(stream.recording, stream.participant_id, "audio", "flac", stream.manifest_key)


def archive_of(running: RunningService) -> Archive:
    return Archive(
        S3Store(running.bucket, "archive", endpoint_url=running.settings.s3_endpoint_url)
    )


async def test_three_speakers_on_a_connection_of_their_own_are_archived_sample_for_sample(
    service: ServiceFactory,
) -> None:
    running = await service(audio_segment_s=3.0)
    sim = Simulation(url=running.url, participants=3, seconds=8, fps=10, start_relative_s=1.0)
    speakers = {p: speaker(p, 8.0) for p in SPEAKERS}
    sent = meeting_audio(speakers, start_s=1.0, jitter_s=0.01)
    await asyncio.gather(
        run_simulation(sim),
        send_audio(running.url, sim.bot_id, sim.recording_id, sent, START),
    )
    await running.settle()

    async with archive_of(running) as archive:
        listed = await archive.streams(
            RecordingId(sim.bot_id, sim.recording_id), video_type="audio"
        )
        assert sorted(s.participant_id for s in listed) == ["100", "101", "102"]
        for participant_id, pcm in speakers.items():
            stream = audio_stream(sim, participant_id)
            manifest = await archive.manifest(stream)
            chunks = sum(1 for p, _ in sent if p == participant_id)
            assert manifest["status"] == "complete"
            assert manifest["type"] == "audio"
            assert manifest["format"] == manifest["codec"] == "flac"
            assert manifest["counters"]["received"] == manifest["counters"]["archived"] == chunks
            assert manifest["counters"]["pending"] == 0
            assert manifest["samples"] == len(pcm) // 2
            assert manifest["gaps"] == []
            assert manifest["audio_separate"] == {"id": "as-1", "metadata": {}}
            assert len(manifest["segments"]) == 3
            first = manifest["segments"][0]["start_sample"]
            assert abs(first - 16_000) <= 160
            line = await archive.audio(stream)
            assert np.array_equal(line[first:], np.frombuffer(pcm, "<i2"))
            assert not line[:first].any()
            assert manifest["worst_placement_s"] <= 0.02
            # The stored bytes are FLAC's: well under the PCM received.
            assert sum(s["bytes"] for s in manifest["segments"]) < 0.7 * len(pcm)

            playlist = m3u8.loads((await running.store.get(stream.playlist_key or "")).decode())
            assert playlist.is_endlist
            assert [s.uri for s in playlist.segments] == [
                s["key"].rpartition("/")[2].join(["segments/", ""]) for s in manifest["segments"]
            ]

        session = await running.json(f"{sim.bot_id}/{sim.recording_id}/session.json")
        kinds = sorted((s["participant_id"], s["type"]) for s in session["streams"])
        assert kinds == sorted([(str(p), t) for p in SPEAKERS for t in ("webcam", "audio")])


async def test_bad_audio_chunks_are_refused_by_reason_and_cost_only_themselves(
    service: ServiceFactory,
) -> None:
    running = await service()
    recording = RecordingId("bot-1", "rec-hostile")
    pcm = speaker(3, 4.0)
    good = list(chunks(pcm, 1.0, jitter_s=0.005, seed=3))
    hostile = {
        10: b"\x01\x02\x03",  # an odd byte count
        20: bytes(16_000 * 2 * 3),  # three seconds in one chunk
        30: "bad base64",
        40: "absurd time",
        50: "already stored",
    }

    def text(pcm: bytes, relative_s: float) -> str:
        message = audio_message(
            pcm, relative_s, START, 100, recording.bot_id, recording.recording_id
        )
        return orjson.dumps(message).decode()

    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        for index, chunk in enumerate(good):
            await ws.send_str(text(chunk.pcm, chunk.relative_s))
            bad = hostile.get(index)
            if isinstance(bad, bytes):
                await ws.send_str(text(bad, chunk.relative_s + 0.01))
            elif bad == "bad base64":
                body = orjson.loads(text(chunk.pcm, chunk.relative_s))
                body["data"]["data"]["buffer"] = "not base64!"
                await ws.send_str(orjson.dumps(body).decode())
            elif bad == "absurd time":
                await ws.send_str(text(chunk.pcm, 1e11))
            elif bad == "already stored":
                await ws.send_str(text(good[index - 5].pcm, good[index - 5].relative_s))
    await running.settle()

    stream_id = StreamId(recording, "100", "audio", "flac")
    info = StreamInfo(recording, "100", "audio", "flac", stream_id.manifest_key)
    async with archive_of(running) as archive:
        manifest = await archive.manifest(info)
        line = await archive.audio(info)
    counters = assert_counters_add_up(manifest)
    assert counters["received"] == len(good) + len(hostile)
    assert counters["archived"] == len(good)
    assert {k: v for k, v in counters.items() if k.startswith("invalid_")} == {
        "invalid_odd_audio_bytes": 1,
        "invalid_audio_chunk_too_large": 1,
        "invalid_bad_base64": 1,
        "invalid_timestamp": 1,
        "invalid_audio_overlap": 1,
    }
    first = manifest["segments"][0]["start_sample"]
    assert np.array_equal(line[first:], np.frombuffer(pcm, "<i2"))
