"""The segmenter's rules, driven with real x264 access units and checked by decoding."""

from __future__ import annotations

import io
import itertools
from datetime import UTC, datetime

import av
import pytest

from archiver.consumers.decode_check import decode
from archiver.errors import MediaError
from archiver.segmenting.fmp4 import (
    TIMESCALE,
    H264Segmenter,
    MediaSegment,
    configuration_of,
    init_segment,
)
from archiver.segmenting.h264 import analyse, probe_config
from archiver.tools.simulator import SimulatedStream, encode_stream

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


def pictures(segments: list[MediaSegment]) -> list[bytes]:
    with av.open(io.BytesIO(segments[0].init + b"".join(s.body for s in segments))) as mp4:
        return [bytes(frame.planes[0]) for frame in mp4.decode(mp4.streams.video[0])]


def test_init_segments_describe_the_senders_parameter_sets() -> None:
    """`avcC` carries the SPS/PPS of the stream, so a decoder that starts at the init
    segment (a player joining, a continued stream) reads the sender's configuration."""
    (_, first), *_ = units(seconds=0.1)
    config = probe_config(analyse(first))
    assert configuration_of(init_segment(config)) == config


def test_a_continued_segmenter_keeps_every_frame_mid_gop_and_decodes_like_one() -> None:
    """One key frame at the start only, as WebRTC senders do: a second segmenter (another
    worker, a new task) takes over after 2 s from the first one's init segment alone."""
    sent = units(seconds=4, keyframe_interval_s=None)
    whole = H264Segmenter(target_s=1)
    reference = [s for t, data in sent for s in whole.push(data, t, NOW)] + whole.flush()
    before = H264Segmenter(target_s=1)
    first = [s for t, data in sent[:20] for s in before.push(data, t, NOW)] + before.flush()
    after = H264Segmenter(target_s=1, first_seq=len(first), last_ticks=first[-1].end_ticks - 1)
    after.resume(configuration_of(first[-1].init), continues_at=first[-1].end_ticks)
    second = [s for t, data in sent[20:] for s in after.push(data, t, NOW)] + after.flush()
    assert after.counters.dropped_before_keyframe == 0
    assert not second[0].starts_with_keyframe
    assert second[0].init == first[0].init
    assert after.gaps == []
    assert sum(s.frames for s in first + second) == len(sent) == 40
    assert pictures(first + second) == pictures(reference)


def test_frames_not_received_in_between_are_a_gap_and_what_follows_is_kept() -> None:
    sent = units(seconds=6, keyframe_interval_s=None)
    before = H264Segmenter(target_s=1)
    first = [s for t, data in sent[:20] for s in before.push(data, t, NOW)] + before.flush()
    after = H264Segmenter(target_s=1, last_ticks=first[-1].end_ticks - 1)
    after.resume(configuration_of(first[-1].init), continues_at=first[-1].end_ticks)
    rest = sent[50:]  # 3 s the bot was away
    second = [s for t, data in rest for s in after.push(data, t, NOW)] + after.flush()
    assert sum(s.frames for s in second) == len(rest)
    (gap,) = after.gaps
    assert gap == {"start": 2.0, "end": 5.0, "reason": "not_received", "references_missing": True}
    mp4 = first[0].init + b"".join(s.body for s in first + second)
    assert samples(mp4) == [round(t * TIMESCALE) for t, _ in sent[:20] + rest]
    # They decode, with artefacts until the next key frame; FFmpeg conceals away the first
    # after a gap that long (it refers to a picture 30 frames back).
    decoded = [f.time_s for f in decode(mp4)]
    assert decoded[20:] == pytest.approx([t for t, _ in rest[1:]])


def samples(mp4: bytes) -> list[int]:
    with av.open(io.BytesIO(mp4)) as container:
        return [p.pts for p in container.demux(container.streams.video[0]) if p.size]


def test_a_stream_never_keyframed_anywhere_still_waits_for_its_key_frame() -> None:
    sent = units(seconds=2, keyframe_interval_s=1)
    fresh = H264Segmenter(target_s=1, last_ticks=-1)
    segments = [s for t, data in sent[3:] for s in fresh.push(data, t, NOW)] + fresh.flush()
    assert fresh.counters.dropped_before_keyframe == 7
    assert segments[0].starts_with_keyframe
