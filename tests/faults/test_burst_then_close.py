"""A bot that sends a fast burst and closes, against the service as a real process: every
frame the client counts as sent is archived and decodes."""

from __future__ import annotations

from archiver.consumers.decode_check import check_stream
from archiver.layout import RecordingId, StreamId
from archiver.tools.loadgen import Load, encode_clip, run_load
from tests.faults.conftest import ServiceProcesses


async def test_a_burst_of_thousands_then_close_is_archived_whole(
    services: ServiceProcesses,
) -> None:
    process = await services.start()
    clip = encode_clip(1.0, 30.0, (320, 240))
    load = Load(process.url, bots=2, participants=8, seconds=8.0, realtime=False)
    report = await run_load(load, clip)
    assert report.frames == report.expected_frames == 2 * 8 * 8 * 30
    assert await process.stop() == 0  # a drain: every stream written out first
    per_stream = report.frames // 16
    for bot in report.bots:
        recording = RecordingId(bot.bot_id, bot.recording_id)
        for participant_id in bot.participant_ids:
            key = StreamId(recording, str(participant_id), "webcam", "h264").manifest_key
            check = await check_stream(services.store, key, key_prefix="archive/")
            assert check.ok, check.problems
            counters = check.manifest["counters"]
            assert (counters["received"], counters["archived"], len(check.frames)) == (
                per_stream,
                per_stream,
                per_stream,
            ), participant_id
