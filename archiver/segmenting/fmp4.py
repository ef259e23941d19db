"""H.264 access units into CMAF-style fragmented MP4, remuxed, never re-encoded.

Each configuration (SPS/PPS) gets its init segment (`ftyp+moov`) from FFmpeg's MP4 muxer,
once. A segment is `moof+mdat` fragments written here (`fragments`), whose `tfdt` carries
the stream's own timeline, so segments concatenate behind their init segment. A frame is
added one step late, once the next timestamp gives it its exact duration.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from archiver.errors import MediaError, SegmenterFailure
from archiver.segmenting.base import DropCounters, SegmentJournal
from archiver.segmenting.fragments import Fragment, SegmentBody
from archiver.segmenting.h264 import AccessUnit, StreamConfig, analyse, probe_config

TIMESCALE = 90_000
_TIME_BASE = Fraction(1, TIMESCALE)
_DEFAULT_DURATION = TIMESCALE // 30
FRAGMENT_BYTES = 256 * 1024
"""An open segment is written out in fragments of about this much sample data."""
_MAX_TICKS = 2**53
"""Far beyond any meeting, and well inside what a fragment's 64-bit decode time holds."""
MIN_GAP_TICKS = TIMESCALE // 1000
"""Frames count as missing between two only when more than this (1 ms) lies between them
beyond the time the first one lasts."""
_MUXER_OPTIONS = {
    # The header of a fragmented file (fragments are written by `fragments`), no edit list.
    "movflags": "frag_keyframe+empty_moov+default_base_moof+frag_discont+skip_trailer",
    "use_editlist": "0",
    "avoid_negative_ts": "disabled",
}


def segment_name(start_ticks: int) -> str:
    """A segment's name: its start in 90 kHz ticks, zero-padded so names sort by time."""
    return f"{start_ticks:013d}"


@dataclass(frozen=True, slots=True)
class MediaSegment:
    """A finished segment and its init segment, ready to store."""

    seq: int
    start_ticks: int
    end_ticks: int
    start_wallclock: datetime
    frames: int
    starts_with_keyframe: bool
    config: StreamConfig
    init: bytes
    init_sha256: str
    size: int
    sha256: str
    body_path: Path | None
    """The written-through file of the media segment, complete and fsynced, when it has one."""
    body_data: bytes | None
    """The media segment's bytes when it was kept in memory instead."""

    @property
    def body(self) -> bytes:
        """The media segment's bytes (read from its file when it has one)."""
        if self.body_data is not None:
            return self.body_data
        assert self.body_path is not None
        return self.body_path.read_bytes()

    @property
    def name(self) -> str:
        return segment_name(self.start_ticks)

    @property
    def frame_count(self) -> int:
        return self.frames


@dataclass(slots=True)
class SegmenterCounters(DropCounters):
    """What the H.264 segmenter did with what it was given; all of it goes into the
    manifest."""

    dropped_before_keyframe: int = 0
    configurations: int = 0
    forced_cuts: int = 0


@dataclass(slots=True)
class _Pending:
    unit: AccessUnit
    ticks: int


@dataclass(frozen=True, slots=True)
class _Held:
    """A frame that arrived before any configuration, kept while one may still turn up."""

    unit: AccessUnit
    ticks: int
    relative_s: float
    absolute: datetime


def init_segment(config: StreamConfig) -> bytes:
    """The init segment of one configuration, from FFmpeg's MP4 muxer (header only). The
    track is copied from a demuxed template, not opened as an encoder: an encoder would
    describe its own SPS/PPS in `avcC` instead of the sender's."""
    buffer = io.BytesIO()
    try:
        with av.open(io.BytesIO(config.parameter_sets), "r", format="h264") as template:
            container = av.open(buffer, "w", format="mp4", options=_MUXER_OPTIONS)
            video = container.add_stream_from_template(template.streams.video[0])
        context = video.codec_context
        context.width = config.width
        context.height = config.height
        context.extradata = config.parameter_sets
        video.time_base = _TIME_BASE
        container.start_encoding()
        container.close()
    except (av.FFmpegError, IndexError) as exc:
        raise MediaError("mux_failed", str(exc)) from exc
    data = buffer.getvalue()
    if _first_box_offset(data, b"moov") < 0:
        raise MediaError("mux_failed", "muxer wrote no moov box")
    return data


def configuration_of(init: bytes) -> StreamConfig:
    """The configuration an init segment describes: its SPS/PPS (from `avcC`, in the Annex-B
    form the segmenter compares key frames with) and picture size. Raise `MediaError`."""
    try:
        with av.open(io.BytesIO(init), "r", format="mp4") as container:
            context = container.streams.video[0].codec_context
            record, width, height = context.extradata or b"", context.width, context.height
    except (av.FFmpegError, IndexError) as exc:
        raise MediaError("unreadable_init", str(exc)) from exc
    parameter_sets = annexb_parameter_sets(record)
    sps = parameter_sets[4:8]
    if len(sps) < 4 or width <= 0 or height <= 0:
        raise MediaError("unreadable_init", "no SPS or no picture size in the init segment")
    return StreamConfig(parameter_sets, width, height, f"avc1.{sps[1]:02X}{sps[2]:02X}{sps[3]:02X}")


def annexb_parameter_sets(record: bytes) -> bytes:
    """The SPS and PPS NAL units of an `AVCDecoderConfigurationRecord` (ISO/IEC 14496-15
    5.3.3.1), each behind a 4-byte start code."""
    if len(record) < 7 or record[0] != 1:
        raise MediaError("unreadable_init", "avcC is not an AVCDecoderConfigurationRecord")
    units: list[bytes] = []
    offset = 5
    for count_mask in (0x1F, 0xFF):
        if offset >= len(record):
            raise MediaError("unreadable_init", "avcC ends early")
        count = record[offset] & count_mask
        offset += 1
        for _ in range(count):
            if offset + 2 > len(record):
                raise MediaError("unreadable_init", "avcC ends early")
            (size,) = struct.unpack_from(">H", record, offset)
            offset += 2
            if offset + size > len(record):
                raise MediaError("unreadable_init", "avcC ends early")
            units.append(b"\x00\x00\x00\x01" + record[offset : offset + size])
            offset += size
    return b"".join(units)


def _gap(start_ticks: int, end_ticks: int) -> dict[str, Any]:
    return {
        "start": round(start_ticks / TIMESCALE, 6),
        "end": round(end_ticks / TIMESCALE, 6),
        "reason": "segmenter_error",
    }


def not_received_gap(start_ticks: int, end_ticks: int, references_missing: bool) -> dict[str, Any]:
    """Frames the archive never got between two that it has (a disconnection); with
    `references_missing`, the frames after it refer to pictures inside it."""
    return {
        **_gap(start_ticks, end_ticks),
        "reason": "not_received",
        "references_missing": references_missing,
    }


def _first_box_offset(data: bytes, box_type: bytes) -> int:
    """Where the first top-level box of a type starts, or -1."""
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, offset)
        if kind == box_type:
            return offset
        if size < 8:
            break
        offset += size
    return -1


class H264Segmenter:
    """Cuts one stream into segments; owned by a single worker, never shared.

    Rules: cut at the first key frame at or after the target duration; with no key frame by
    twice the target, or once the segment holds `max_frames` or `max_bytes`, cut anyway (the
    next segment is flagged as not starting with a key frame); a key frame with new SPS/PPS
    always cuts and starts a new init segment.
    """

    def __init__(
        self,
        target_s: float,
        first_seq: int = 0,
        last_ticks: int = -1,
        journal: SegmentJournal | None = None,
        max_frames: int = 2**31,
        max_bytes: int = 2**62,
        folder: Path | None = None,
    ) -> None:
        self.target_ticks = round(target_s * TIMESCALE)
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._segment_bytes = 0
        self.journal = journal
        self.counters = SegmenterCounters()
        self._next_seq = first_seq
        self._last_ticks = last_ticks
        self._last_duration = _DEFAULT_DURATION
        self._config: StreamConfig | None = None
        self._init = b""
        self._init_sha256 = ""
        self._init_config: StreamConfig | None = None
        self.folder = folder
        """Where open segments are written through to (None: they are kept in memory)."""
        self._fragment: Fragment | None = None
        """The open segment's fragment being filled, or None between segments."""
        self._body: SegmentBody | None = None
        self._pending: _Pending | None = None
        self._segment_start = 0
        self._segment_wallclock: datetime | None = None
        self._segment_frames = 0
        self._segment_keyframe_start = False
        self.gaps: list[dict[str, Any]] = []
        """Time ranges lost, for the manifest (the stream takes them)."""
        self._gap_start: int | None = None
        self._continues_at: int | None = None
        """Where the archive this segmenter continues ends, until its first frame arrives."""
        self._gap_ticks = MIN_GAP_TICKS
        self.awaiting_configuration = False
        """Holding frames before any key frame: the configuration they continue may still
        become readable (another process is storing the segment that began it)."""
        self._held: list[_Held] = []
        self._held_bytes = 0

    @property
    def last_ticks(self) -> int:
        return self._last_ticks

    def snapshot(self) -> dict[str, int]:
        return self.counters.snapshot()

    @property
    def held_frames(self) -> int:
        """Frames taken into the open segment, or held for a configuration, not yet in a
        finished segment."""
        return (self._segment_frames if self._fragment is not None else 0) + len(self._held)

    def push(self, data: bytes, relative_s: float, absolute: datetime) -> list[MediaSegment]:
        """Add one access unit; return the segments it closed (zero or one, rarely two).
        Raise `MediaError` for a unit that is not archived; `SegmenterFailure` when the
        segmenter itself failed (what it held is salvaged, the unit is dropped)."""
        try:
            unit = analyse(data)
            if not 0 <= relative_s < _MAX_TICKS / TIMESCALE:  # also false for NaN
                raise MediaError("timestamp", f"relative {relative_s!r} out of range")
            ticks = round(relative_s * TIMESCALE)
            new_config = self._new_config(unit)
        except MediaError as exc:
            self.reject(exc.reason)
            raise
        try:
            return self._take(unit, new_config, ticks, relative_s, absolute)
        except Exception as exc:  # any failure of ours costs this unit only
            raise SegmenterFailure(repr(exc), self._salvage(unit, ticks)) from exc

    def _take(
        self,
        unit: AccessUnit,
        new_config: StreamConfig | None,
        ticks: int,
        relative_s: float,
        absolute: datetime,
    ) -> list[MediaSegment]:
        if ticks <= self._last_ticks:
            ticks = self._last_ticks + 1
            self.counters.timestamps_adjusted += 1

        if self._config is None and new_config is None:
            if self.awaiting_configuration and self._may_hold(len(unit.data)):
                self._held.append(_Held(unit, ticks, relative_s, absolute))
                self._held_bytes += len(unit.data)
            else:
                self.counters.dropped_before_keyframe += 1
            return []
        if new_config is not None and self.awaiting_configuration:
            self.stop_awaiting()  # the stream starts afresh at this key frame
        self._last_ticks = ticks
        if self._continues_at is not None:
            if ticks - self._continues_at > self._gap_ticks:
                gap = not_received_gap(self._continues_at, ticks, not unit.is_keyframe)
                self.gaps.append(gap)
            self._continues_at = None

        closed: list[MediaSegment] = []
        elapsed = ticks - self._segment_start
        if self._fragment is not None:
            reconfigured = new_config is not None and new_config != self._config
            if reconfigured or (unit.is_keyframe and elapsed >= self.target_ticks):
                closed.append(self._close(ticks))
            elif elapsed >= 2 * self.target_ticks or self._segment_full(len(unit.data)):
                self.counters.forced_cuts += 1
                closed.append(self._close(ticks))
        if new_config is not None and new_config != self._config:
            self._config = new_config
            self.counters.configurations += 1
        if self._fragment is None:
            self._open(ticks, absolute, unit.is_keyframe)
        elif self._pending is not None:
            self._add_pending(ticks - self._pending.ticks)
        self._pending = _Pending(unit, ticks)
        self._segment_frames += 1
        self._segment_bytes += len(unit.data)
        if self.journal is not None:
            self.journal.record(relative_s, absolute, unit.data)
        return closed

    def _salvage(self, unit: AccessUnit, ticks: int) -> list[MediaSegment]:
        """After a failure of ours: close what the open segment holds (it is published),
        count what cannot be saved, and wait for the next key frame to start afresh."""
        if self._pending is None or self._pending.unit is not unit:
            self.counters.drop("segmenter_error")
        salvaged: list[MediaSegment] = []
        if self._fragment is not None and self._pending is not None:
            try:
                salvaged.append(self._close(self._pending.ticks + self._last_duration))
            except Exception:  # noqa: BLE001 (the segment is lost; say how many frames)
                self.counters.drop("segmenter_error", self._segment_frames)
        if self._body is not None:
            self._body.discard()
            self._body = None
        self._fragment = None
        self._pending = None
        self._segment_frames = 0
        self._config = None
        self._last_ticks = max(self._last_ticks, ticks)
        self.counters.segmenter_resets += 1
        if self._gap_start is None:
            self._gap_start = ticks
        return salvaged

    def flush(self) -> list[MediaSegment]:
        """Close the open segment at stream end; the last frame keeps the previous duration.
        Frames still held for a configuration are dropped (counted)."""
        self.stop_awaiting()
        if self._gap_start is not None:
            self.gaps.append(_gap(self._gap_start, max(self._gap_start, self._last_ticks)))
            self._gap_start = None
        if self._fragment is None or self._pending is None:
            return []
        return [self._close(self._pending.ticks + self._last_duration)]

    def _segment_full(self, next_unit_bytes: int) -> bool:
        """Cut an open segment at a size as well as a duration, so units that do not
        advance time (repeated timestamps) cannot grow it without end."""
        return (
            self._segment_frames >= self.max_frames
            or self._segment_bytes + next_unit_bytes > self.max_bytes
        )

    def _new_config(self, unit: AccessUnit) -> StreamConfig | None:
        """A key frame's configuration when it differs from the current one, else None."""
        if not unit.is_keyframe or not unit.parameter_sets:
            return None
        if self._config is not None and unit.parameter_sets == self._config.parameter_sets:
            return None
        return probe_config(unit)

    def reject(self, reason: str) -> None:
        """Count an access unit that never reached the muxer, by why."""
        self.counters.drop(reason)

    def resume(
        self, config: StreamConfig, continues_at: int | None = None, gap_ticks: int = MIN_GAP_TICKS
    ) -> list[MediaSegment]:
        """Continue with a known configuration, so frames before the next key frame are kept
        (recovery replays a segment that may not start with one; a stream continues what
        another process archived). `continues_at`: where that archive ends (90 kHz ticks,
        its last frame's end); a first frame more than `gap_ticks` after it records the
        frames not received in between. Frames held for it go first; return the segments
        they closed."""
        self._config = config
        self._continues_at = continues_at
        self._gap_ticks = max(MIN_GAP_TICKS, gap_ticks)
        self.awaiting_configuration = False
        held, self._held, self._held_bytes = self._held, [], 0
        closed: list[MediaSegment] = []
        for frame in held:
            closed += self._take(frame.unit, None, frame.ticks, frame.relative_s, frame.absolute)
        return closed

    def await_configuration(self) -> None:
        """Hold frames that arrive before any key frame (within `max_frames` and `max_bytes`)
        instead of dropping them, until `resume` or `stop_awaiting`."""
        self.awaiting_configuration = self._config is None

    def stop_awaiting(self) -> None:
        """No configuration will come: what was held is dropped, counted."""
        self.awaiting_configuration = False
        self.counters.dropped_before_keyframe += len(self._held)
        self._held, self._held_bytes = [], 0

    def _may_hold(self, size: int) -> bool:
        return len(self._held) < self.max_frames and self._held_bytes + size <= self.max_bytes

    def _open(self, ticks: int, absolute: datetime, keyframe: bool) -> None:
        assert self._config is not None
        if self._init_config != self._config:
            self._init = init_segment(self._config)
            self._init_sha256 = hashlib.sha256(self._init).hexdigest()
            self._init_config = self._config
        self._fragment = Fragment(sequence=self._next_seq + 1, decode_time=ticks)
        name = segment_name(ticks)
        self._body = SegmentBody(None if self.folder is None else self.folder / f"{name}.mp4")
        if self._gap_start is not None:
            self.gaps.append(_gap(self._gap_start, ticks))
            self._gap_start = None
        if self.journal is not None:
            self.journal.begin(name, self._config.as_record())
        self._segment_start = ticks
        self._segment_wallclock = absolute
        self._segment_frames = 0
        self._segment_bytes = 0
        self._segment_keyframe_start = keyframe

    def _add_pending(self, duration: int) -> None:
        fragment = self._fragment
        assert fragment is not None
        assert self._body is not None
        assert self._pending is not None
        fragment.add(self._pending.unit.sample, duration, self._pending.unit.is_keyframe)
        if fragment.size >= FRAGMENT_BYTES:
            self._body.write(fragment.to_bytes())
            next_time = self._pending.ticks + duration
            self._fragment = Fragment(sequence=fragment.sequence + 1, decode_time=next_time)
        self._last_duration = duration
        self._pending = None

    def _close(self, end_ticks: int) -> MediaSegment:
        assert self._fragment is not None
        assert self._config is not None
        assert self._pending is not None
        assert self._segment_wallclock is not None
        body = self._body
        assert body is not None
        self._add_pending(end_ticks - self._pending.ticks)
        if self._fragment.table:
            body.write(self._fragment.to_bytes())
        body.finish()
        segment = MediaSegment(
            seq=self._next_seq,
            start_ticks=self._segment_start,
            end_ticks=end_ticks,
            start_wallclock=self._segment_wallclock,
            frames=self._segment_frames,
            starts_with_keyframe=self._segment_keyframe_start,
            config=self._config,
            init=self._init,
            init_sha256=self._init_sha256,
            size=body.size,
            sha256=body.sha256,
            body_path=body.path,
            body_data=body.data,
        )
        self._next_seq += 1
        self._fragment = None
        self._body = None
        return segment
