"""Whatever a stream's messages carry, a segmenter raises only `InputError`s and keeps
archiving the good frames that follow: driven with real x264 units and real PNGs, mixed
with garbage, mutations and absurd timestamps."""

from __future__ import annotations

import io
import itertools
import sys
import tarfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from archiver.consumers.decode_check import decode
from archiver.errors import InputError, MediaError
from archiver.segmenting.fmp4 import TIMESCALE, H264Segmenter, MediaSegment
from archiver.segmenting.h264 import MAX_NAL_UNITS, analyse, probe_config
from archiver.segmenting.png import PNG_TRAILER, PngBatch, PngBatcher, read_header
from tests.hostile import START, h264_units, png_images

PROPERTIES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FinishedT = TypeVar("FinishedT")

# Far outside any meeting, or before the recording started.
ABSURD_RELATIVE = [1e300, -1e300, 1e12, 1e18, -5.0, -0.5, sys.float_info.max, 2.0**63]
relatives = (
    st.sampled_from(ABSURD_RELATIVE)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.floats(min_value=0, max_value=5)
)
# What parsing lets through: any UTC time that ISO-8601 can write.
absolutes = st.datetimes(
    min_value=datetime(1, 1, 1),  # noqa: DTZ001 (hypothesis wants naive bounds)
    max_value=datetime(9999, 12, 31),  # noqa: DTZ001
    timezones=st.just(UTC),
) | st.just(START)


def hostile_units() -> list[bytes]:
    """Real units of a 160x120 stream: what mutations start from."""
    return [data for _, data in h264_units()]


def nal(kind: int, body: bytes) -> bytes:
    return b"\x00\x00\x00\x01" + bytes([kind]) + body


nal_soup = st.lists(
    st.builds(
        nal,
        st.sampled_from([0x65, 0x67, 0x68, 0x41, 0x06, 0x09, 0x00, 0xFF]),
        st.binary(max_size=64),
    ),
    min_size=1,
    max_size=8,
).map(b"".join)


@st.composite
def mutated_unit(draw: st.DrawFn) -> bytes:
    """A real unit with bytes flipped, cut short, spliced, or stripped of its slices."""
    units = hostile_units()
    data = bytearray(draw(st.sampled_from(units)))
    how = draw(st.sampled_from(["flip", "cut", "splice", "params_only", "no_start_code"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= draw(st.integers(1, 255))
    elif how == "cut":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif how == "splice":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=32))
    elif how == "params_only":
        first_slice = units[0].find(b"\x00\x00\x01\x65")
        data = bytearray(units[0][: first_slice - 1])
    else:
        data = data.lstrip(b"\x00").removeprefix(b"\x01")
    return bytes(data)


garbage_units = st.binary(max_size=256) | nal_soup | mutated_unit()


@PROPERTIES
@given(st.binary(max_size=2048) | nal_soup | mutated_unit())
@example(b"")
@example(b"\x00\x00\x01")
@example(b"\x00\x00\x00\x01\x67\x42")
@example(b"\x00\x00\x01\x09" * (MAX_NAL_UNITS + 1) + b"\x00\x00\x01\x65")
def test_analyse_and_probe_raise_only_media_error(data: bytes) -> None:
    try:
        unit = analyse(data)
    except MediaError:
        return
    if unit.is_keyframe:
        try:
            config = probe_config(unit)
        except MediaError:
            return
        assert config.width > 0
        assert config.height > 0


def test_analyse_of_a_buffer_of_start_codes_is_refused_quickly() -> None:
    with pytest.raises(MediaError) as refused:
        analyse(b"\x00\x00\x01\x07" * 3_000_000)
    assert refused.value.reason == "too_many_nal_units"


def collect(push: Callable[[], list[FinishedT]], into: list[FinishedT]) -> str | None:
    """Run one push; keep what it closed, or what a failure salvaged. The reason of an
    `InputError`; anything else fails the test."""
    try:
        into.extend(push())
    except InputError as exc:
        # A failure of the segmenter's own hands back what it had to close.
        into.extend(getattr(exc, "salvaged", []))
        return exc.reason
    return None


def frames_of(segments: list[MediaSegment], parameter_sets: bytes) -> list[float]:
    """Decoded times of the frames archived under one configuration."""
    mine = [s for s in segments if s.config.parameter_sets == parameter_sets]
    if not mine:
        return []
    played = decode(mine[0].init + b"".join(s.body for s in mine))
    assert len(played) == sum(s.frames for s in mine)
    return [f.time_s for f in played]


@PROPERTIES
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["good", "garbage", "garbage", "good_absurd_time"]),
            garbage_units,
            relatives,
            absolutes,
        ),
        max_size=24,
    )
)
def test_h264_segmenter_survives_anything_and_archives_the_good_frames_after_it(
    hostile: list[tuple[str, bytes, float, datetime]],
) -> None:
    segmenter = H264Segmenter(target_s=0.5)
    segments: list[MediaSegment] = []
    units = hostile_units()
    good = itertools.cycle(units)
    for kind, junk, relative, absolute in hostile:
        data = next(good) if kind != "garbage" else junk
        collect(lambda: segmenter.push(data, relative, absolute), segments)  # noqa: B023
    # A fresh participant size: a new configuration, so its frames are easy to tell apart.
    after = h264_units(176, 144)
    start = max([10.0, *(r for _, _, r, _ in hostile if 0 <= r < 1e6)])
    for t, data in after:
        reason = collect(lambda: segmenter.push(data, start + t, START), segments)  # noqa: B023
        assert reason is None
    collect(segmenter.flush, segments)
    times = frames_of(segments, analyse(after[0][1]).parameter_sets)
    assert len(times) == len(after)
    assert all(a < b for a, b in itertools.pairwise(times))


@SOME
@given(
    st.lists(
        st.tuples(st.integers(1, 9), st.sampled_from(ABSURD_RELATIVE)),
        min_size=1,
        max_size=6,
    )
)
@example([(3, 1e300), (5, 1e12), (7, -5.0)])
def test_frames_with_absurd_relative_times_are_dropped_and_the_rest_keep_their_times(
    bad: list[tuple[int, float]],
) -> None:
    """A copy of a real unit with an absurd `relative` never moves the frames after it."""
    segmenter = H264Segmenter(target_s=10)
    segments: list[MediaSegment] = []
    units = list(h264_units())
    reasons: list[str | None] = []
    for index, (t, data) in enumerate(units):
        for at, relative in bad:
            if at == index:
                reasons.append(collect(lambda: segmenter.push(data, relative, START), segments))  # noqa: B023
        assert collect(lambda: segmenter.push(data, t, START), segments) is None  # noqa: B023
    collect(segmenter.flush, segments)
    assert frames_of(segments, analyse(units[0][1]).parameter_sets) == pytest.approx(
        [t for t, _ in units], abs=1 / TIMESCALE
    )
    assert reasons == ["timestamp"] * len(bad)
    assert segmenter.snapshot()["invalid_timestamp"] == len(bad)


def test_a_relative_of_1e300_is_refused_as_a_timestamp_and_the_stream_goes_on() -> None:
    segmenter = H264Segmenter(target_s=10)
    segments: list[MediaSegment] = []
    units = list(h264_units())
    for index, (t, data) in enumerate(units):
        relative = 1e300 if index == 4 else t
        collect(lambda: segmenter.push(data, relative, START), segments)  # noqa: B023
    collect(segmenter.flush, segments)
    times = frames_of(segments, analyse(units[0][1]).parameter_sets)
    assert times == pytest.approx([t for i, (t, _) in enumerate(units) if i != 4], abs=1e-9)


# PNG


def truncated(image: bytes, keep: int) -> bytes:
    """An image cut short with its signature and IHDR intact."""
    return image[: 33 + keep % (len(image) - 33)]


@st.composite
def mutated_png(draw: st.DrawFn) -> bytes:
    images = png_images()
    data = bytearray(draw(st.sampled_from(images)))
    how = draw(st.sampled_from(["truncate", "flip", "flip_header", "append", "garbage"]))
    if how == "truncate":
        return truncated(bytes(data), draw(st.integers(0, 10**6)))
    if how in ("flip", "flip_header"):
        top = 33 if how == "flip_header" else len(data) - 1
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, top))] ^= draw(st.integers(1, 255))
        return bytes(data)
    if how == "append":
        return bytes(data) + draw(st.binary(min_size=1, max_size=16))
    return draw(st.binary(max_size=64))


def members(batches: list[PngBatch]) -> list[bytes]:
    """Every frame's bytes, read back from the tars."""
    out: list[bytes] = []
    for batch in batches:
        with tarfile.open(fileobj=io.BytesIO(batch.body), mode="r:") as tar:
            for member in tar.getmembers():
                extracted = tar.extractfile(member)
                assert extracted is not None
                out.append(extracted.read())
    return out


@given(st.binary(max_size=128) | mutated_png())
@PROPERTIES
@example(b"")
@example(png_images()[0][:-1])
@example(png_images()[0][:40])
def test_read_header_raises_only_media_error_and_never_passes_a_cut_image(data: bytes) -> None:
    try:
        header = read_header(data)
    except MediaError:
        return
    assert header.width > 0
    assert header.height > 0
    assert data.endswith(PNG_TRAILER)


def test_a_png_cut_short_is_refused_as_truncated() -> None:
    image = png_images()[0]
    for length in (33, 34, 133, len(image) - 12, len(image) - 1):
        with pytest.raises(MediaError) as refused:
            read_header(image[:length])
        assert refused.value.reason == "truncated_png"
    assert read_header(image).width == 64


@PROPERTIES
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["good", "bad", "bad"]),
            mutated_png(),
            relatives,
            absolutes,
        ),
        max_size=16,
    )
)
def test_png_batcher_survives_anything_and_archives_the_good_frames_after_it(
    hostile: list[tuple[str, bytes, float, datetime]],
) -> None:
    batcher = PngBatcher(max_frames=4, max_s=2.0)
    batches: list[PngBatch] = []
    images = png_images()
    for index, (kind, junk, relative, absolute) in enumerate(hostile):
        data = images[index % len(images)] if kind == "good" else junk
        reason = collect(lambda: batcher.push(data, relative, absolute), batches)  # noqa: B023
        if kind != "good" and data[:33] == images[0][:33] and not data.endswith(PNG_TRAILER):
            assert reason == "truncated_png"
    after = png_images(6, 32, 24)
    start = max([10.0, *(r for _, _, r, _ in hostile if 0 <= r < 1e6)])
    for n, image in enumerate(after):
        absolute = START + timedelta(seconds=n / 2)
        assert collect(lambda: batcher.push(image, start + n / 2, absolute), batches) is None  # noqa: B023
    collect(batcher.flush, batches)
    archived = members(batches)
    assert [m for m in archived if m in after] == list(after)
    assert not any(m.startswith(images[0][:33]) and not m.endswith(PNG_TRAILER) for m in archived)
