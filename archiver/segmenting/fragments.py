"""The media fragments of an fMP4 segment (`moof` + `mdat`), written without a muxer.

Muxing each frame through FFmpeg cost more than anything else on the path of a frame (a
`Packet` and a `mux` call per frame, and the muxer holding the whole fragment in memory).
A fragment is simple enough to write here: the sample data in `mdat`, and in `moof` a
sequence number (`mfhd`) and one track fragment (`traf`: `tfhd` with the moof as base
offset, `tfdt` with the first sample's decode time, `trun` with each sample's duration,
size and sync flag). The init segment (`ftyp` + `moov`) still comes from FFmpeg
(`fmp4.init_segment`), so players see the same track description as before.

Samples are converted the way FFmpeg's MP4 muxer converts Annex-B H.264 (`ff_nal_parse_units`):
each NAL unit without its start code, behind a 4-byte big-endian length.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

_START = b"\x00\x00\x01"
_TRACK_ID = 1
_TFHD_DEFAULT_BASE_IS_MOOF = 0x020000
_TRUN_FLAGS = 0x000001 | 0x000100 | 0x000200 | 0x000400
"""data-offset, and per sample: duration, size, flags."""
SYNC_SAMPLE = 0x02000000
"""Depends on no other sample."""
NON_SYNC_SAMPLE = 0x01010000
"""Depends on others; not a sync sample."""
_SAMPLE = struct.Struct(">III")
_MAX_DURATION = 2**32 - 1
_BOX_HEADER = struct.Struct(">I4s")


def _find_start(data: bytes, begin: int) -> int:
    """FFmpeg's `ff_avc_find_startcode`: where the next start code begins (a zero before a
    three-byte code belongs to it), or the end of `data`."""
    found = data.find(_START, begin)
    if found < 0:
        return len(data)
    if found > begin and data[found - 1] == 0:
        return found - 1
    return found


def avcc(data: bytes) -> bytes:
    """An Annex-B access unit as length-prefixed NAL units, as FFmpeg's muxer writes it."""
    end = len(data)
    view = memoryview(data)
    parts: list[bytes | memoryview] = []
    start = _find_start(data, 0)
    while True:
        # Past the zeros of the start code and its 0x01.
        while start < end:
            start += 1
            if data[start - 1]:
                break
        if start >= end:
            break
        nal_end = _find_start(data, start)
        parts.append(struct.pack(">I", nal_end - start))
        parts.append(view[start:nal_end])
        start = nal_end
    return b"".join(parts)


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return _BOX_HEADER.pack(8 + len(body), kind) + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *payload)


@dataclass(slots=True)
class Fragment:
    """The samples of one fragment as they are added; `bytes()` once it is complete."""

    sequence: int
    """The `mfhd` sequence number."""
    decode_time: int
    """The first sample's decode time, in the track's timescale."""
    samples: list[bytes] = field(default_factory=list)
    table: list[bytes] = field(default_factory=list)
    """Each sample's `trun` entry: duration, size, flags."""
    size: int = 0
    """Bytes of sample data so far."""

    def add(self, sample: bytes, duration: int, sync: bool) -> None:
        # A duration beyond 32 bits (a last frame before a gap of days) is cut to the
        # longest `trun` holds; the segment's end is kept in its manifest entry.
        duration = min(duration, _MAX_DURATION)
        flags = SYNC_SAMPLE if sync else NON_SYNC_SAMPLE
        self.samples.append(sample)
        self.table.append(_SAMPLE.pack(duration, len(sample), flags))
        self.size += len(sample)

    def to_bytes(self) -> bytes:
        """`moof` + `mdat`. The `trun` data offset counts from the start of the `moof`."""
        count = len(self.table)
        moof_size = 8 + 16 + 8 + 16 + 20 + (20 + 12 * count)
        mfhd = _full_box(b"mfhd", 0, 0, struct.pack(">I", self.sequence))
        tfhd = _full_box(b"tfhd", 0, _TFHD_DEFAULT_BASE_IS_MOOF, struct.pack(">I", _TRACK_ID))
        tfdt = _full_box(b"tfdt", 1, 0, struct.pack(">Q", self.decode_time))
        trun = _full_box(
            b"trun", 0, _TRUN_FLAGS, struct.pack(">Ii", count, moof_size + 8), *self.table
        )
        moof = _box(b"moof", mfhd, _box(b"traf", tfhd, tfdt, trun))
        return b"".join([moof, _BOX_HEADER.pack(8 + self.size, b"mdat"), *self.samples])


class SegmentBody:
    """Where an open segment's fragments go as they are made, hashed on the way.

    With a path (a live stream's, beside its journal) they are written through to that
    file, so a stream holds one fragment in memory rather than its whole open segment;
    the spool then takes the file as it is. Like the journal, it holds no descriptor
    between writes (hundreds of open streams must not take as many files). Without a path
    (recovery, tests), or once the file cannot be written, fragments stay in memory."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.size = 0
        self._on_disk = 0
        self._hash = hashlib.sha256()
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)
        if self.path is not None:
            flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if self._on_disk else os.O_TRUNC)
            with contextlib.suppress(OSError):
                fd = os.open(self.path, flags, 0o644)
                try:
                    written = os.write(fd, data)
                finally:
                    os.close(fd)
                if written == len(data):
                    self._on_disk += written
                    return
            self._keep_in_memory()
        self._parts.append(data)

    def _keep_in_memory(self) -> None:
        """The file failed (a full disk): what it holds comes back, the rest stays here."""
        assert self.path is not None
        written = self.path.read_bytes()[: self._on_disk] if self._on_disk else b""
        self.path.unlink(missing_ok=True)
        self.path = None
        self._parts = [written]

    def finish(self) -> None:
        """The file is complete and on disk (fsynced), as the spool takes nothing less."""
        if self.path is None:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            self._keep_in_memory()

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    @property
    def data(self) -> bytes | None:
        """The bytes when they are in memory, else None (they are in `path`)."""
        return b"".join(self._parts) if self.path is None else None
