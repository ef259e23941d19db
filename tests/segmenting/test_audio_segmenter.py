"""The audio segmenter on its own: chunks placed on the sample clock, encoded, decoded back."""

from __future__ import annotations

import io
import itertools
import math
from datetime import UTC, datetime, timedelta

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archiver.errors import MediaError
from archiver.segmenting.audio import SAMPLE_RATE, AudioSegment, AudioSegmenter
from tests.speech import Chunk, chunks, speaker

START = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


def feed(segmenter: AudioSegmenter, sent: list[Chunk]) -> list[AudioSegment]:
    finished: list[AudioSegment] = []
    for chunk in sent:
        absolute = START + timedelta(seconds=chunk.relative_s)
        finished.extend(segmenter.push(chunk.pcm, chunk.relative_s, absolute))
    return finished + segmenter.flush()


def decoded(segment: AudioSegment) -> tuple[int, np.ndarray]:
    """The segment's first sample on the timeline (its decode time) and its samples."""
    with av.open(io.BytesIO(segment.init + segment.body)) as container:
        frames = list(container.decode(audio=0))
    first = frames[0].pts
    assert first is not None
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    parts = [f.to_ndarray().reshape(-1) for frame in frames for f in resampler.resample(frame)]
    parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return first, np.concatenate(parts)


def timeline(segments: list[AudioSegment]) -> np.ndarray:
    """Every segment's samples at their place, silence between."""
    placed = [decoded(segment) for segment in segments]
    end = max(first + len(samples) for first, samples in placed)
    line = np.zeros(end, dtype=np.int16)
    for first, samples in placed:
        line[first : first + len(samples)] = samples
    return line


def as_array(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    jitter_ms=st.integers(0, 25),
    start_s=st.floats(0, 3600, allow_nan=False),
    seed=st.integers(0, 2**16),
)
def test_jittered_chunks_of_varying_sizes_are_joined_sample_for_sample(
    jitter_ms: int, start_s: float, seed: int
) -> None:
    pcm = speaker(seed, 8.0)
    sent = list(chunks(pcm, start_s, jitter_ms / 1000, seed=seed))
    segmenter = AudioSegmenter("flac", 3.0)
    segments = feed(segmenter, sent)

    assert [s.start_sample for s in segments[1:]] == [s.end_sample for s in segments[:-1]]
    joined = np.concatenate([decoded(s)[1] for s in segments])
    assert np.array_equal(joined, as_array(pcm))
    assert sum(s.chunks for s in segments) == len(sent)
    assert segmenter.gaps == []
    assert not segmenter.counters.silence_samples
    assert not segmenter.counters.trimmed_samples
    assert abs(segments[0].start_sample - round(start_s * SAMPLE_RATE)) <= jitter_ms * 16 + 1
    assert max(s.worst_placement_s for s in segments) <= 2 * jitter_ms / 1000 + 1e-4
    assert decoded(segments[1])[0] == segments[1].start_sample


def test_a_short_gap_is_stored_as_silence_and_a_long_one_starts_a_new_segment() -> None:
    first, second, third = speaker(0, 2.0), speaker(1, 2.0), speaker(2, 2.0)
    sent = [
        *chunks(first, 1.0, seed=1),
        *chunks(second, 4.5, seed=2),  # 1.5 s after `first` ends: filled
        *chunks(third, 30.0, seed=3),  # 23.5 s after `second` ends: a new segment
    ]
    segmenter = AudioSegmenter("flac", 60.0, fill_s=10.0)
    segments = feed(segmenter, sent)

    assert [(s.start_sample, s.end_sample) for s in segments] == [
        (16_000, 6.5 * 16_000),
        (30 * 16_000, 32 * 16_000),
    ]
    assert segments[0].silence_samples == 24_000
    line = timeline(segments)
    assert np.array_equal(line[16_000:48_000], as_array(first))
    assert not line[48_000:72_000].any()
    assert np.array_equal(line[72_000:104_000], as_array(second))
    assert np.array_equal(line[480_000:512_000], as_array(third))
    assert segmenter.gaps == [
        {"start": 3.0, "end": 4.5, "reason": "not_received", "filled": True},
        {"start": 6.5, "end": 30.0, "reason": "not_received", "filled": False},
    ]


def test_a_sender_clock_200_ppm_fast_is_followed_within_20_ms_and_every_step_listed() -> None:
    pcm = speaker(4, 600.0)
    sent = list(chunks(pcm, 2.0, jitter_s=0.004, ppm=200, seed=4))
    segmenter = AudioSegmenter("flac", 60.0)
    segments = feed(segmenter, sent)

    adjustments = [a for s in segments for a in s.adjustments]
    inserted = sum(a["samples"] for a in adjustments)
    # 600 s at 200 ppm is 120 ms the timestamps run ahead of the samples.
    assert 0.1 * SAMPLE_RATE <= inserted <= 0.14 * SAMPLE_RATE
    assert len(adjustments) == segmenter.counters.drift_adjustments >= 6
    assert all(a["reason"] == "drift" and a["samples"] > 0 for a in adjustments)
    assert max(s.worst_placement_s for s in segments) <= 0.020
    # Independently of the segmenter's own measure: where the last chunk ended up.
    last = sent[-1]
    end_error = segments[-1].end_sample - (last.relative_s * SAMPLE_RATE + len(last.pcm) // 2)
    assert abs(end_error) <= 0.020 * SAMPLE_RATE
    assert sum(s.silence_samples for s in segments) == inserted
    assert len(timeline(segments)) - segments[0].start_sample == len(pcm) // 2 + inserted


def test_bad_chunks_are_refused_by_reason_and_cost_themselves_only() -> None:
    pcm = speaker(5, 3.0)
    good = list(chunks(pcm, 0.5, seed=5))
    segmenter = AudioSegmenter("flac", 60.0, max_chunk_s=2.0)
    refused = []
    hostile = [
        (b"\x01\x02\x03", 1.0),  # an odd byte count
        (b"", 1.0),
        (bytes(2 * 16_000 * 3), 1.0),  # three seconds in one chunk
        (b"\x00\x01", math.nan),
        (b"\x00\x01", -5.0),
        (b"\x00\x01", 1e12),
    ]
    segments: list[AudioSegment] = []
    for index, chunk in enumerate(good):
        segments += segmenter.push(chunk.pcm, chunk.relative_s, START)
        if index < len(hostile):
            data, relative = hostile[index]
            with pytest.raises(MediaError) as raised:
                segmenter.push(data, relative, START)
            refused.append(raised.value.reason)
    segments += segmenter.flush()

    assert refused == [
        "odd_audio_bytes",
        "empty_audio",
        "audio_chunk_too_large",
        "timestamp",
        "timestamp",
        "timestamp",
    ]
    assert segmenter.counters.dropped_invalid == len(hostile)
    assert np.array_equal(np.concatenate([decoded(s)[1] for s in segments]), as_array(pcm))


def test_overlapping_and_backwards_chunks_are_cut_to_what_is_new() -> None:
    pcm = speaker(6, 2.0)
    segmenter = AudioSegmenter("flac", 60.0)
    first, second = pcm[: 16_000 * 2], pcm[16_000 * 2 :]
    segments = segmenter.push(first, 1.0, START)
    # Starts 0.25 s before `first` ends: the first 4,000 samples overlap what is stored.
    segments += segmenter.push(second, 1.75, START)
    with pytest.raises(MediaError, match="already stored"):
        segmenter.push(first[:8000], 1.1, START)  # backwards, wholly inside what is stored
    segments += segmenter.flush()

    (segment,) = segments
    assert (segment.start_sample, segment.end_sample) == (16_000, 44_000)
    assert segment.trimmed_samples == 4000
    assert np.array_equal(
        decoded(segment)[1], np.concatenate([as_array(first), as_array(second)[4000:]])
    )
    assert segmenter.counters.drop_reasons == {"audio_overlap": 1}
    assert segmenter.gaps == [
        {"start": 1.75, "end": 2.0, "reason": "overlap"},
        {"start": 1.1, "end": 2.75, "reason": "overlap"},
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 40_000),
            st.one_of(st.floats(-10, 200), st.sampled_from([0.0, 1e9, math.nan])),
        ),
        max_size=30,
    )
)
def test_any_sequence_of_chunks_is_stored_or_refused_and_every_sample_accounted(
    raw: list[tuple[int, float]],
) -> None:
    segmenter = AudioSegmenter("flac", 5.0, fill_s=2.0)
    segments: list[AudioSegment] = []
    accepted = 0
    for size, relative in raw:
        try:
            segments += segmenter.push(bytes(size), relative, START)
        except MediaError:
            continue
        accepted += size // 2
    segments += segmenter.flush()

    counters = segmenter.counters
    stored = sum(s.end_sample - s.start_sample for s in segments)
    assert stored == accepted + counters.silence_samples - sum(s.trimmed_samples for s in segments)
    for earlier, later in itertools.pairwise(segments):
        assert later.start_sample >= earlier.end_sample
    for segment in segments:
        first, samples = decoded(segment)
        assert first == segment.start_sample
        assert len(samples) == segment.end_sample - segment.start_sample


def test_opus_segments_decode_to_their_duration_in_place() -> None:
    pcm = speaker(7, 6.0)
    segments = feed(AudioSegmenter("opus", 3.0), list(chunks(pcm, 10.0, seed=7)))

    assert segments[0].start_sample == 160_000
    for segment in segments:
        first, samples = decoded(segment)
        assert first == segment.start_sample
        assert abs(len(samples) - (segment.end_sample - segment.start_sample)) <= 960
    assert sum(s.size for s in segments) < len(pcm) / 4
