"""The load generator: many bots from one process, every frame delivered."""

from __future__ import annotations

from archiver.cli import _parser
from archiver.consumers.decode_check import check_stream
from archiver.layout import RecordingId, StreamId
from archiver.tools.loadgen import Load, encode_clip, run_load
from tests.conftest import ServiceFactory


async def test_two_bots_deliver_every_frame(service: ServiceFactory) -> None:
    running = await service()
    clip = encode_clip(2.0, 10.0, (160, 120))
    load = Load(
        running.url,
        bots=2,
        participants=3,
        seconds=2.0,
        realtime=False,
        record_send_times=True,
        join_interval_s=0.2,
    )
    report = await run_load(load, clip)
    await running.settle()
    assert report.frames == report.expected_frames == 2 * 3 * len(clip.units)
    assert len({bot.bot_id for bot in report.bots}) == 2
    for bot in report.bots:
        recording = RecordingId(bot.bot_id, bot.recording_id)
        for number, participant_id in enumerate(bot.participant_ids):
            key = StreamId(recording, str(participant_id), "webcam", "h264").manifest_key
            check = await check_stream(running.store, key, key_prefix="archive/")
            assert check.ok, check.problems
            assert [f.time_s for f in check.frames] == [u[0] for u in clip.units]
            assert len(bot.send_times[number]) == len(clip.units)
    summary = report.summary()
    assert summary["frames"] == summary["frames_expected"]
    assert summary["send_lag_p50_ms"] is None  # fast: no due times


async def test_a_load_longer_than_its_clip_replays_it(service: ServiceFactory) -> None:
    running = await service()
    clip = encode_clip(1.0, 10.0, (160, 120))
    load = Load(running.url, participants=1, seconds=3.0, realtime=False)
    report = await run_load(load, clip)
    await running.settle()
    assert report.frames == report.expected_frames == 3 * len(clip.units)
    bot = report.bots[0]
    key = StreamId(RecordingId(bot.bot_id, bot.recording_id), "100", "webcam", "h264")
    check = await check_stream(running.store, key.manifest_key, key_prefix="archive/")
    assert check.ok, check.problems
    times = [f.time_s for f in check.frames]
    assert times == sorted(times)
    assert len(set(times)) == len(times) == report.frames


async def test_realtime_reports_send_lag(service: ServiceFactory) -> None:
    running = await service()
    clip = encode_clip(0.5, 10.0, (160, 120))
    report = await run_load(Load(running.url, bots=2, participants=1, seconds=0.5), clip)
    await running.settle()
    summary = report.summary()
    assert summary["messages"] == 2 * (len(clip.units) + 2)  # frames, a join and a leave
    assert summary["send_lag_p50_ms"] is not None
    assert summary["send_lag_p99_ms"] >= summary["send_lag_p50_ms"]


def test_simulate_takes_bots_and_pace() -> None:
    args = _parser().parse_args(["simulate", "--url", "ws://x/ws", "--bots", "3", "--fast"])
    assert (args.bots, args.fast) == (3, True)
    args = _parser().parse_args(["simulate", "--url", "ws://x/ws", "--realtime"])
    assert (args.bots, args.fast) == (None, False)
