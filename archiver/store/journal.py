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
    """Appends one stream's accepted frames; used by whichever thread segments the stream."""

    def __init__(self, folder: Path, header: dict[str, Any]) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        header_path = folder / "stream.json"
        if not header_path.exists():
            tmp = folder / "stream.json.tmp"
            tmp.write_bytes(orjson.dumps(header))
            os.replace(tmp, header_path)
        self._fd: int | None = None
        self._name: str | None = None
        self._synced_at = time.monotonic()
        self.failures = 0
        """Writes that failed (disk full, no file descriptors): those frames are still
        segmented and uploaded, only not safe from a crash of this process."""
        self.last_error = ""

    def begin(self, name: str, config: dict[str, Any] | None) -> None:
        """Start the file of a new open segment, named like its segment."""
        self._close_file()
        self._name = name
        try:
            self._fd = os.open(self.folder / f"{name}.jnl", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            if config is not None:
                body = orjson.dumps(config)
                os.write(self._fd, _FRAME.pack(_CONFIG, 0.0, 0, len(body)) + body)
        except OSError as exc:
            self._failed(exc)

    def record(self, relative_s: float, absolute: datetime, data: bytes) -> None:
        if self._fd is None:
            return
        stamp = absolute.isoformat().encode()
        try:
            os.write(self._fd, _FRAME.pack(_DATA, relative_s, len(stamp), len(data)) + stamp + data)
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        self.failures += 1
        self.last_error = str(exc)

    def sync_if_due(self) -> None:
        """fsync at most once a second: a process crash loses nothing already written, a
        machine crash at most the last second."""
        now = time.monotonic()
        if self._fd is not None and now - self._synced_at >= SYNC_INTERVAL_S:
            self._synced_at = now
            try:
                os.fsync(self._fd)
            except OSError as exc:
                self._failed(exc)

    def discard(self, name: str) -> None:
        """Forget a segment's frames: it is in the spool now."""
        (self.folder / f"{name}.jnl").unlink(missing_ok=True)

    def close(self, remove: bool) -> None:
        """Close the open file; with `remove`, the stream ended cleanly: drop the folder."""
        self._close_file()
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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


def stream_folders(root: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every stream folder a previous process left, with its header."""
    if not root.is_dir():
        return
    for folder in sorted(root.iterdir()):
        header = folder / "stream.json"
        if header.is_file():
            yield folder, orjson.loads(header.read_bytes())
