"""A bot that closes right after a burst loses nothing: every frame written before its close
frame is read, archived and decodes, also when the service was still reading slowly."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime

import aiohttp
import orjson

from archiver.consumers.decode_check import check_stream
from archiver.ingest.server import STATE
from archiver.layout import RecordingId, StreamId
from archiver.tools.loadgen import Load, encode_clip, run_load
from archiver.tools.simulator import (
    Simulation,
    close_like_a_bot,
    media_message,
    run_simulation,
    watch_for_close,
)
from tests.conftest import RunningService, ServiceFactory


async def _archived(running: RunningService, stream: StreamId) -> tuple[int, int, int]:
    """(received, archived, decoded) of one stream, from its manifest and its media."""
    check = await check_stream(running.store, stream.manifest_key, key_prefix="archive/")
    assert check.ok, check.problems
    counters = check.manifest["counters"]
    return counters["received"], counters["archived"], len(check.frames)


async def test_a_fast_burst_then_close_archives_every_frame(service: ServiceFactory) -> None:
    running = await service()
    clip = encode_clip(1.0, 30.0, (160, 120))
    load = Load(running.url, participants=8, seconds=12.0, realtime=False)
    report = await run_load(load, clip)
    await running.settle()
    assert report.frames == report.expected_frames == 8 * 12 * 30
    bot = report.bots[0]
    assert bot.close_code is None  # the client closed; the service only replied
    recording = RecordingId(bot.bot_id, bot.recording_id)
    per_stream = report.frames // 8
    for participant_id in bot.participant_ids:
        stream = StreamId(recording, str(participant_id), "webcam", "h264")
        assert await _archived(running, stream) == (per_stream, per_stream, per_stream)


async def test_close_arriving_while_reading_is_slowed_loses_nothing(
    service: ServiceFactory,
) -> None:
    """One stream with a queue of one message: the socket is read only as fast as the
    stream's worker takes frames, so the close frame is sent while most of the burst is
    still unread; the service reads up to it and archives all."""
    running = await service(stream_queue_messages=1, batch_window_s=0.0)
    clip = encode_clip(2.0, 30.0, (640, 360))
    recording = RecordingId("bot-slow", "recording-slow")
    stream = StreamId(recording, "100", "webcam", "h264")
    start = datetime.now(UTC)
    frames = [
        orjson.dumps(
            media_message(
                base64.b64decode(buffer),
                replay * 2.0 + relative,
                start,
                "webcam",
                100,
                recording.bot_id,
                recording.recording_id,
            )
        ).decode()
        for replay in range(25)
        for relative, buffer, _ in clip.units
    ]
    registry = running.app[STATE].writers.streams
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(running.url, max_msg_size=0) as ws,
    ):
        watcher = asyncio.create_task(watch_for_close(ws, asyncio.Event()))
        for text in frames:
            await ws.send_str(text)
        read_when_closing = registry.streams[stream].received
        assert await close_like_a_bot(ws, watcher) is None
    await running.settle()
    assert read_when_closing < len(frames), "the burst was read before the close: no test"
    assert await _archived(running, stream) == (len(frames), len(frames), len(frames))


async def test_a_simulated_meeting_sent_fast_arrives_whole(service: ServiceFactory) -> None:
    running = await service()
    simulation = await run_simulation(
        Simulation(running.url, participants=3, seconds=12.0, screenshare=True, resize_at_s=6.0)
    )
    await running.settle()
    recording = RecordingId(simulation.bot_id, simulation.recording_id)
    for planned in simulation.streams:
        stream = StreamId(recording, str(planned.participant_id), planned.video_type, "h264")
        sent = len(planned.sent)
        assert await _archived(running, stream) == (sent, sent, sent)
