"""PNG frames into tar batches, each image checked from its header and never decoded.

A batch is a plain tar of one stream's frames, each member named by its relative time so
that names sort in time order. The manifest records where each member's data starts in the
tar, so a consumer can fetch a single frame with an HTTP Range request.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from archiver.errors import MediaError, SegmenterFailure
from archiver.segmenting.base import DropCounters, SegmentJournal

MICROS = 1_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR = struct.Struct(">I4sII")
_IHDR_END = 8 + 8 + 13
_MAX_DIMENSION = 2**31 - 1
PNG_TRAILER = b"\x00\x00\x00\x00IEND\xaeB`\x82"
"""The IEND chunk, always the same 12 bytes: the last thing a whole PNG holds."""
_MAX_MICROS = 10**13
_USTAR_MAX_MTIME = 8**11 - 1
"""Thirteen digits of microseconds in batch names: 115 days, far beyond any meeting."""


@dataclass(frozen=True, slots=True)
class PngHeader:
    width: int
    height: int


def read_header(data: bytes) -> PngHeader:
    """Check the signature, the IHDR chunk (length, type, CRC, size) and that the buffer ends
    with the IEND chunk (an image cut short does not); raise `MediaError` naming what is
    wrong. Nothing is decoded."""
    if not data.startswith(PNG_SIGNATURE):
        raise MediaError("not_png", "buffer does not start with the PNG signature")
    if len(data) < _IHDR_END + 4:
        raise MediaError("bad_png_header", "too short for an IHDR chunk")
    length, kind, width, height = _IHDR.unpack_from(data, len(PNG_SIGNATURE))
    if kind != b"IHDR" or length != 13:
        raise MediaError("bad_png_header", "the first chunk is not IHDR")
    (crc,) = struct.unpack_from(">I", data, _IHDR_END)
    if zlib.crc32(data[12:_IHDR_END]) != crc:
        raise MediaError("bad_png_header", "IHDR checksum mismatch")
    if not 0 < width <= _MAX_DIMENSION or not 0 < height <= _MAX_DIMENSION:
        raise MediaError("bad_png_header", f"impossible size {width}x{height}")
    if len(data) < _IHDR_END + 4 + len(PNG_TRAILER) or not data.endswith(PNG_TRAILER):
        raise MediaError("truncated_png", "the buffer does not end with the IEND chunk")
    return PngHeader(width, height)


def member_name(micros: int) -> str:
    """A frame's name in its batch: zero-padded seconds and microseconds, sorting by time."""
    seconds, fraction = divmod(micros, MICROS)
    return f"{seconds:06d}.{fraction:06d}.png"


def batch_name(start_micros: int) -> str:
    """A batch's name: its first frame's time in microseconds, zero-padded."""
    return f"{start_micros:013d}"


@dataclass(frozen=True, slots=True)
class PngFrame:
    """One archived frame: where it is inside its batch and what it shows."""

    name: str
    micros: int
    absolute: datetime
    width: int
    height: int
    size: int
    offset: int
    """Byte offset of the frame's data inside the tar (`TarInfo.offset_data`)."""


@dataclass(frozen=True, slots=True)
class PngBatch:
    """A finished tar batch, ready to store."""

    seq: int
    start_micros: int
    end_micros: int
    start_wallclock: datetime
    frames: tuple[PngFrame, ...]
    body: bytes

    @property
    def name(self) -> str:
        return batch_name(self.start_micros)

    @property
    def frame_count(self) -> int:
        return len(self.frames)


@dataclass(frozen=True, slots=True)
class _Pending:
    micros: int
    absolute: datetime
    header: PngHeader
    data: bytes


class PngBatcher:
    """Collects one stream's PNGs into tar batches; owned by a single worker, never shared.

    A batch closes once it holds `max_frames` or `max_bytes`, before a frame `max_s` or more
    after its first
    (relative timestamps), and at stream end. Repeated or stepped-back timestamps move 1 µs
    past the previous frame, so every member name is unique and in order.
    """

    def __init__(
        self,
        max_frames: int,
        max_s: float,
        first_seq: int = 0,
        last_micros: int = -1,
        journal: SegmentJournal | None = None,
        max_bytes: int = 2**62,
    ) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._pending_bytes = 0
        self.max_micros = round(max_s * MICROS)
        self.journal = journal
        self.counters = DropCounters()
        self.gaps: list[dict[str, Any]] = []
        self._next_seq = first_seq
        self._last_micros = last_micros
        self._pending: list[_Pending] = []

    @property
    def held_frames(self) -> int:
        return len(self._pending)

    def push(self, data: bytes, relative_s: float, absolute: datetime) -> list[PngBatch]:
        """Add one PNG; return the batches it closed (zero, one, or two)."""
        try:
            header = read_header(data)
            if not 0 <= relative_s < _MAX_MICROS / MICROS:  # also false for NaN
                raise MediaError("timestamp", f"relative {relative_s!r} out of range")
            micros = round(relative_s * MICROS)
        except MediaError as exc:
            self.reject(exc.reason)
            raise
        held = len(self._pending)
        try:
            return self._take(header, data, micros, absolute)
        except Exception as exc:  # any failure of ours costs this frame only
            raise SegmenterFailure(repr(exc), self._salvage(held, micros)) from exc

    def _take(
        self, header: PngHeader, data: bytes, micros: int, absolute: datetime
    ) -> list[PngBatch]:
        if micros <= self._last_micros:
            micros = self._last_micros + 1
            self.counters.timestamps_adjusted += 1
        self._last_micros = micros
        closed: list[PngBatch] = []
        if self._pending and micros - self._pending[0].micros >= self.max_micros:
            closed.append(self._close())
        if not self._pending and self.journal is not None:
            self.journal.begin(batch_name(micros), None)
        self._pending.append(_Pending(micros, absolute, header, data))
        if self.journal is not None:
            # The adjusted time, so a replay names every member as this run would have.
            self.journal.record(micros / MICROS, absolute, data)
        self._pending_bytes += len(data)
        if len(self._pending) >= self.max_frames or self._pending_bytes >= self.max_bytes:
            closed.append(self._close())
        return closed

    def flush(self) -> list[PngBatch]:
        """Close the open batch at stream end."""
        return [self._close()] if self._pending else []

    def reject(self, reason: str) -> None:
        """Count a frame that was not archived, by why."""
        self.counters.drop(reason)

    def _salvage(self, held: int, micros: int) -> list[PngBatch]:
        """After a failure of ours: close the frames the batch held before this one (they are
        published); count what cannot be saved, and the failed frame, as dropped."""
        self._pending = self._pending[:held]
        self._pending_bytes = sum(len(p.data) for p in self._pending)
        self.counters.drop("segmenter_error")
        self.counters.segmenter_resets += 1
        salvaged: list[PngBatch] = []
        if self._pending:
            try:
                salvaged.append(self._close())
            except Exception:  # noqa: BLE001 (the batch is lost; say how many frames)
                self.counters.drop("segmenter_error", len(self._pending))
                self._pending = []
        self._last_micros = max(self._last_micros, micros)
        self.gaps.append(
            {"start": micros / MICROS, "end": micros / MICROS, "reason": "segmenter_error"}
        )
        return salvaged

    def snapshot(self) -> dict[str, int]:
        return self.counters.snapshot()

    def _close(self) -> PngBatch:
        pending = self._pending
        body, offsets = build_tar([(member_name(p.micros), p.absolute, p.data) for p in pending])
        frames = tuple(
            PngFrame(
                name=member_name(p.micros),
                micros=p.micros,
                absolute=p.absolute,
                width=p.header.width,
                height=p.header.height,
                size=len(p.data),
                offset=offset,
            )
            for p, offset in zip(pending, offsets, strict=True)
        )
        batch = PngBatch(
            seq=self._next_seq,
            start_micros=pending[0].micros,
            end_micros=pending[-1].micros,
            start_wallclock=pending[0].absolute,
            frames=frames,
            body=body,
        )
        self._next_seq += 1
        self._pending = []
        self._pending_bytes = 0
        return batch


def build_tar(members: list[tuple[str, datetime, bytes]]) -> tuple[bytes, list[int]]:
    """A ustar archive of plain files (name, modification time, bytes), and each member's
    data offset as tarfile reads it back."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, modified, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            # ustar holds 11 octal digits of non-negative seconds; the time of record is in
            # the member's name and the manifest, this is only what `tar -tv` shows.
            info.mtime = min(max(0, int(modified.timestamp())), _USTAR_MAX_MTIME)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    body = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as reader:
        offsets = {member.name: member.offset_data for member in reader.getmembers()}
    return body, [offsets[name] for name, _, _ in members]
