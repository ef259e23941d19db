"""The journal of what each stream has received but not yet closed into a segment.

A worker that crashes takes its open segments with it; the journal keeps their frames on
local disk (written as they arrive, fsynced at least once a second), so the next process
can turn them into segments. One folder per stream, one file per open segment: the file is
deleted once its segment is safely in the spool.
"""

from __future__ import annotations

import os
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

_FRAME = struct.Struct(">cdHI")
_CONFIG = b"C"
_DATA = b"F"
SYNC_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class JournaledFrame:
    relative_s: float
    absolute: datetime
    data: bytes


@dataclass(slots=True)
class JournaledSegment:
    """What one journal file holds: the configuration it started with and its frames."""

    path: Path
    config: dict[str, Any] | None
    frames: list[JournaledFrame]


class StreamJournal:
    """Appends one stream's accepted frames; used by whichever thread segments the stream.

    It holds no file open between writes: a process serving a thousand streams would
    otherwise hold a thousand descriptors. A buffered journal (media) collects a batch's
    records and writes them in one open-write-close at `flush`, fsyncing at most once a
    second; an unbuffered one (events, on the receive loop) writes each record at once to
    the page cache."""

    def __init__(self, folder: Path, header: dict[str, Any], buffered: bool = False) -> None:
        self.folder = folder
        self.buffered = buffered
        folder.mkdir(parents=True, exist_ok=True)
        header_path = folder / "stream.json"
        if not header_path.exists():
            tmp = folder / "stream.json.tmp"
            tmp.write_bytes(orjson.dumps(header))
            os.replace(tmp, header_path)
        self._name: str | None = None
        self._records: list[bytes] = []
        self._synced_at = time.monotonic()
        self.held_bytes = 0
        """Bytes of this journal's files on disk now: they count against the spool's cap."""
        self._file_bytes: dict[str, int] = {}
        self.failures = 0
        """Writes that failed (disk full, no file descriptors): those frames are still
        segmented and uploaded, only not safe from a crash of this process."""
        self.last_error = ""

    def begin(self, name: str, config: dict[str, Any] | None) -> None:
        """Start the file of a new open segment, named like its segment."""
        self.flush()
        self._name = name
        if config is not None:
            body = orjson.dumps(config)
            self._add(_FRAME.pack(_CONFIG, 0.0, 0, len(body)), body)

    def record(self, relative_s: float, absolute: datetime, data: bytes) -> None:
        stamp = absolute.isoformat().encode()
        self._add(_FRAME.pack(_DATA, relative_s, len(stamp), len(data)) + stamp, data)

    def _add(self, *parts: bytes) -> None:
        """Buffer one record, in parts: the payload is copied once, when the batch is
        written."""
        if self._name is None:
            return
        self._records.extend(parts)
        if not self.buffered:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered to the open segment's file; fsync at most once a second,
        so a process crash loses nothing written, a machine crash at most the last second."""
        if not self._records or self._name is None:
            return
        body = b"".join(self._records)
        self._records = []
        now = time.monotonic()
        sync = self.buffered and now - self._synced_at >= SYNC_INTERVAL_S
        try:
            fd = os.open(self.folder / f"{self._name}.jnl", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                os.write(fd, body)
                if sync:
                    self._synced_at = now
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.failures += 1
            self.last_error = str(exc)
            return
        self._file_bytes[self._name] = self._file_bytes.get(self._name, 0) + len(body)
        self.held_bytes += len(body)

    def discard(self, name: str) -> None:
        """Forget a segment's frames: it is in the spool now."""
        (self.folder / f"{name}.jnl").unlink(missing_ok=True)
        self.held_bytes -= self._file_bytes.pop(name, 0)

    def close(self, remove: bool) -> None:
        """Write what is buffered; with `remove`, the stream ended cleanly: drop the folder."""
        self.flush()
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)
            self._file_bytes.clear()
            self.held_bytes = 0


def read_segment(path: Path) -> JournaledSegment:
    """Read a journal file; a record cut short by the crash ends it."""
    data = path.read_bytes()
    segment = JournaledSegment(path, None, [])
    offset = 0
    while offset + _FRAME.size <= len(data):
        kind, relative, stamp_len, body_len = _FRAME.unpack_from(data, offset)
        start = offset + _FRAME.size
        end = start + stamp_len + body_len
        if end > len(data):
            break
        if kind == _CONFIG:
            segment.config = orjson.loads(data[start:end])
        else:
            stamp = data[start : start + stamp_len].decode()
            segment.frames.append(
                JournaledFrame(
                    relative, datetime.fromisoformat(stamp), data[start + stamp_len : end]
                )
            )
        offset = end
    return segment


def first_config(path: Path) -> dict[str, Any] | None:
    """The configuration record a journal file begins with, reading only that record: the
    file may be another process's, still being appended to."""
    with path.open("rb") as file:
        head = file.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return None
        kind, _, stamp_len, body_len = _FRAME.unpack(head)
        if kind != _CONFIG:
            return None
        body = file.read(stamp_len + body_len)
    if len(body) < stamp_len + body_len:
        return None
    config: dict[str, Any] = orjson.loads(body)
    return config


def stream_folders(root: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every stream folder a previous process left, with its header."""
    if not root.is_dir():
        return
    for folder in sorted(root.iterdir()):
        header = folder / "stream.json"
        if not header.is_file():
            continue
        try:
            yield folder, orjson.loads(header.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue  # a folder whose header never got written holds no frame either
