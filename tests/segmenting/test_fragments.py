"""Fragments written by `archiver.segmenting.fragments` against FFmpeg's own MP4 muxer: the
same sample bytes, and the same pictures at the same 90 kHz times when decoded."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import struct
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path

import av
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archiver.errors import MediaError
from archiver.segmenting import fmp4
from archiver.segmenting.fmp4 import TIMESCALE, H264Segmenter, MediaSegment
from archiver.segmenting.fragments import avcc
from archiver.segmenting.h264 import analyse
from archiver.tools.simulator import SimulatedStream, encode_stream

NOW = datetime(2026, 1, 1, tzinfo=UTC)
_MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof+frag_discont+skip_trailer"


def units(keyframe_interval_s: float | None) -> list[tuple[float, bytes]]:
    plan = SimulatedStream(100, "webcam", [(0.0, (160, 120))])
    return [(t, d) for t, d, _ in encode_stream(plan, 3, 10, keyframe_interval_s)]


def ffmpeg_mux(
    segment: MediaSegment, sent: list[tuple[int, bytes, bool]], first_keyframe: bytes
) -> bytes:
    """The segment's frames muxed by FFmpeg, as the archiver did before it wrote fragments,
    the track copied from FFmpeg's own probe of the stream's first key frame."""
    buffer = io.BytesIO()
    options = {
        "movflags": _MOVFLAGS,
        "use_editlist": "0",
        "avoid_negative_ts": "disabled",
        "fragment_index": str(segment.seq + 1),
    }
    with (
        av.open(io.BytesIO(first_keyframe), "r", format="h264") as probed,
        av.open(buffer, "w", format="mp4", options=options) as container,
    ):
        video = container.add_stream_from_template(probed.streams.video[0])
        video.time_base = Fraction(1, TIMESCALE)
        ends = [ticks for ticks, _, _ in sent[1:]] + [segment.end_ticks]
        for (ticks, data, key), end in zip(sent, ends, strict=True):
            packet = av.Packet(data)
            packet.pts = packet.dts = ticks
            packet.duration = end - ticks
            packet.time_base = Fraction(1, TIMESCALE)
            packet.is_keyframe = key
            packet.stream = video
            container.mux(packet)
    return buffer.getvalue()


def boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    """Top-level boxes: (type, the whole box)."""
    found = []
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, offset)
        found.append((kind, data[offset : offset + size]))
        offset += size
    return found


def pictures(mp4: bytes) -> list[tuple[int, bytes]]:
    with av.open(io.BytesIO(mp4), "r") as container:
        return [
            (frame.pts or 0, bytes(frame.planes[0]))
            for frame in container.decode(container.streams.video[0])
        ]


@pytest.mark.parametrize("keyframe_interval_s", [None, 0.5])
def test_segments_decode_like_ffmpegs_and_carry_its_sample_bytes(
    keyframe_interval_s: float | None,
) -> None:
    segmenter = H264Segmenter(target_s=1)
    sent: list[tuple[int, bytes, bool]] = []
    segments: list[MediaSegment] = []
    for t, data in units(keyframe_interval_s):
        sent.append((round(t * TIMESCALE), data, analyse(data).is_keyframe))
        segments += segmenter.push(data, t, NOW)
    segments += segmenter.flush()
    assert len(segments) >= 2
    reference_body = b""
    for segment in segments:
        frames = [f for f in sent if segment.start_ticks <= f[0] < segment.end_ticks]
        reference = boxes(ffmpeg_mux(segment, frames, sent[0][1]))
        first_moof = next(i for i, (kind, _) in enumerate(reference) if kind == b"moof")
        assert segment.init == b"".join(box for _, box in reference[:first_moof])
        reference_body += b"".join(box for _, box in reference[first_moof:])
        ours = [box for kind, box in boxes(segment.body) if kind == b"mdat"]
        theirs = [box for kind, box in reference if kind == b"mdat"]
        assert b"".join(b[8:] for b in ours) == b"".join(b[8:] for b in theirs)
    ours_decoded = pictures(segments[0].init + b"".join(s.body for s in segments))
    assert ours_decoded == pictures(segments[0].init + reference_body)
    assert [ticks for ticks, _ in ours_decoded] == [ticks for ticks, _, _ in sent]


def test_avcc_follows_ffmpeg_around_odd_start_codes() -> None:
    # Four-byte start codes, trailing zeros kept but one, a start code at the very end.
    data = b"\x00\x00\x00\x01\x67\xaa\x00\x00\x01\x68\xbb\x00\x00\x00\x00\x01\x65\xcc\x00\x00\x01"
    assert avcc(data) == (
        b"\x00\x00\x00\x02\x67\xaa" + b"\x00\x00\x00\x03\x68\xbb\x00" + b"\x00\x00\x00\x02\x65\xcc"
    )


def test_open_segments_are_written_through_in_fragments_and_decode_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live stream's segmenter writes each open segment to a file as it goes, many small
    fragments here, and the result plays exactly like the segment kept in memory."""
    monkeypatch.setattr(fmp4, "FRAGMENT_BYTES", 2000)
    sent = units(keyframe_interval_s=None)
    in_memory = H264Segmenter(target_s=1)
    written = H264Segmenter(target_s=1, folder=tmp_path)
    kept: list[MediaSegment] = []
    through: list[MediaSegment] = []
    for index, (t, data) in enumerate(sent):
        kept += in_memory.push(data, t, NOW)
        through += written.push(data, t, NOW)
        if index == 5:  # the first segment is open, its first fragments are on disk
            assert not through
            assert (tmp_path / "0000000000000.mp4").stat().st_size > 2000
    kept += in_memory.flush()
    through += written.flush()
    assert len(through) == len(kept) >= 2
    for ours, reference in zip(through, kept, strict=True):
        assert ours.body_path is not None
        assert ours.body_data is None
        assert reference.body_path is None
        body = ours.body_path.read_bytes()
        assert len(body) == ours.size
        assert hashlib.sha256(body).hexdigest() == ours.sha256
        assert sum(kind == b"moof" for kind, _ in boxes(body)) > 1
    played = pictures(through[0].init + b"".join(s.body for s in through))
    assert played == pictures(kept[0].init + b"".join(s.body for s in kept))
    assert [ticks for ticks, _ in played] == [round(t * TIMESCALE) for t, _ in sent]


@pytest.mark.parametrize("failure", ["short_write", "no_space"])
def test_a_segment_whose_file_fails_is_kept_whole_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """A full disk part way through an open segment: what was written comes back from the
    file, the rest stays in memory, and the segment is whole."""
    monkeypatch.setattr(fmp4, "FRAGMENT_BYTES", 2000)
    sent = units(keyframe_interval_s=None)[:8]
    reference = H264Segmenter(target_s=10)
    failing = H264Segmenter(target_s=10, folder=tmp_path)
    real_write = os.write
    writes = 0

    def disk_fills_up(fd: int, data: bytes) -> int:
        nonlocal writes
        writes += 1
        if writes < 3:
            return real_write(fd, data)
        if failure == "short_write":
            return real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("archiver.segmenting.fragments.os.write", disk_fills_up)
    for t, data in sent:
        assert not reference.push(data, t, NOW)
        assert not failing.push(data, t, NOW)
    (kept,) = reference.flush()
    (recovered,) = failing.flush()
    assert writes == 3
    assert recovered.body_path is None
    assert list(tmp_path.iterdir()) == []
    assert recovered.body == kept.body
    assert recovered.sha256 == hashlib.sha256(kept.body).hexdigest()


_PIECES = [
    b"\x00",
    b"\x00\x00\x01",
    b"\x00\x00\x00\x01",
    b"\x65\x88",
    b"\x41\x9a",
    b"\x67",
    b"\x68",
]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(_PIECES) | st.binary(min_size=1, max_size=6), max_size=12),
    st.sampled_from([b"\x00\x00\x01", b"\x00\x00\x00\x01"]),
)
def test_the_sample_made_while_classifying_is_ffmpegs_for_any_bytes(
    pieces: list[bytes], start: bytes
) -> None:
    data = start + b"".join(pieces)
    try:
        unit = analyse(data)
    except MediaError:
        return
    assert unit.sample == avcc(data)
