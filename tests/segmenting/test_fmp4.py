"""The segmenter's rules, driven with real x264 access units and checked by decoding."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest

from archiver.errors import MediaError
from archiver.segmenting.fmp4 import (
    TIMESCALE,
    H264Segmenter,
    MediaSegment,
    configuration_of,
    init_segment,
)
from archiver.segmenting.h264 import analyse, probe_config
from archiver.simulator import SimulatedStream, encode_stream
from archiver.verify import decode

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def units(seconds: float = 3, fps: float = 10, keyframe_interval_s: float | None = None):
    plan = SimulatedStream(100, "webcam", [(0.0, (160, 120))])
    return [(t, data) for t, data, _ in encode_stream(plan, seconds, fps, keyframe_interval_s)]


def play(segments: list[MediaSegment]) -> list[float]:
    assert len({s.init for s in segments}) == 1
    return [f.time_s for f in decode(segments[0].init + b"".join(s.body for s in segments))]


def test_keyframe_detection_and_codec_string() -> None:
    (_t0, first), (_t1, second) = units(seconds=0.2)
    assert analyse(first).is_keyframe
    assert not analyse(second).is_keyframe
    with pytest.raises(MediaError):
        analyse(b"\x89PNG\r\n\x1a\n")


def test_repeated_and_backward_timestamps_keep_decode_order_strictly_increasing() -> None:
    segmenter = H264Segmenter(target_s=10)
    sent = units(seconds=1)
    times = [t for t, _ in sent]
    times[4] = times[3]
    times[7] = times[5]
    segments: list[MediaSegment] = []
    for t, (_, data) in zip(times, sent, strict=True):
        segments += segmenter.push(data, t, NOW)
    segments += segmenter.flush()
    played = play(segments)
    assert len(played) == 10
    assert all(a < b for a, b in itertools.pairwise(played))
    assert segmenter.counters.timestamps_adjusted == 2
    assert played[4] == pytest.approx(times[3] + 1 / TIMESCALE)
    assert played[0] == times[0]


def test_frames_before_the_first_keyframe_are_counted_not_archived() -> None:
    segmenter = H264Segmenter(target_s=10)
    sent = units(seconds=2, keyframe_interval_s=1)
    segments: list[MediaSegment] = []
    for t, data in sent[1:]:
        segments += segmenter.push(data, t, NOW)
    segments += segmenter.flush()
    assert segmenter.counters.dropped_before_keyframe == 9
    assert sum(segment.frames for segment in segments) == 10
    assert segmenter.held_frames == 0
    assert play(segments)[0] == pytest.approx(1.0)


def test_cut_waits_for_a_keyframe_after_the_target() -> None:
    segmenter = H264Segmenter(target_s=1)
    segments: list[MediaSegment] = []
    for t, data in units(seconds=5, keyframe_interval_s=1.5):
        segments += segmenter.push(data, t, NOW)
    segments += segmenter.flush()
    assert [round(s.start_ticks / TIMESCALE, 2) for s in segments] == [0.0, 1.5, 3.0, 4.5]
    assert all(s.starts_with_keyframe for s in segments)
    assert segments[-1].end_ticks == 5 * TIMESCALE
    assert len(play(segments)) == 50


def test_units_that_never_advance_time_are_still_cut_by_count_and_by_size() -> None:
    sent = units(seconds=3)
    by_count = H264Segmenter(target_s=10, max_frames=8)
    segments: list[MediaSegment] = []
    for _, data in sent:
        segments += by_count.push(data, 1.0, NOW)  # one timestamp for all of them
    segments += by_count.flush()
    assert [s.frames for s in segments] == [8, 8, 8, 6]
    assert [s.starts_with_keyframe for s in segments] == [True, False, False, False]
    assert by_count.counters.forced_cuts == 3
    assert len(play(segments)) == 30

    limit = 4 * max(len(data) for _, data in sent)
    by_size = H264Segmenter(target_s=10, max_bytes=limit)
    sized: list[MediaSegment] = []
    for t, data in sent:
        sized += by_size.push(data, t, NOW)
    sized += by_size.flush()
    assert len(sized) > 1
    assert all(len(s.body) <= limit + 4096 for s in sized)
    assert sum(s.frames for s in sized) == 30


def test_init_segments_describe_the_senders_parameter_sets() -> None:
    """`avcC` carries the SPS/PPS of the stream, so a decoder that starts at the init
    segment (a player joining, a continued stream) reads the sender's configuration."""
    (_, first), *_ = units(seconds=0.1)
    config = probe_config(analyse(first))
    assert configuration_of(init_segment(config)) == config
