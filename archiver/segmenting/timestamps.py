"""Timestamps that one bad message cannot poison.

Every media message carries two clocks: `relative` (seconds since the recording started,
the archive's timeline) and `absolute` (wall-clock time). Their difference is the moment
the recording started, which is the same for every frame of a stream: a pair that
disagrees with it by more than the tolerance is an outlier, whichever of the two is wrong.
Legitimate jumps (a camera off for ten minutes, a reconnect) move both clocks together and
are kept.

Which one is wrong decides what happens:
- `relative` jumped (it does not continue the stream's own timeline): the frame is dropped
  and counted as `invalid_timestamp`, so the frames around it keep their exact times.
- `relative` continues the stream and only `absolute` is off: `relative` is the timeline of
  record, so the frame is kept and its wall-clock time is rebuilt from the stream's start
  (counted as `absolute_repaired`).
- The first frame of a stream sets the start. Should that frame be the outlier, the stream
  would otherwise refuse every later frame: once `REANCHOR_FRAMES` frames in a row agree
  with each other but not with the start, they become the start (`timestamp_reanchors`).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from archiver.errors import MediaError

REANCHOR_FRAMES = 3
_EPOCH = datetime.fromtimestamp(0, UTC)


class TimestampGuard:
    """One stream's view of when its recording started; owned by the stream's worker."""

    def __init__(self, tolerance_s: float, max_relative_s: float) -> None:
        self.tolerance_s = tolerance_s
        self.max_relative_s = max_relative_s
        self.absolute_repaired = 0
        self.reanchors = 0
        self._start: float | None = None
        self._last_relative: float | None = None
        self._candidate: float | None = None
        self._candidate_frames = 0

    def seed(self, start_s: float, last_relative_s: float) -> None:
        """Continue a stream whose earlier frames are archived: its start is known."""
        if math.isfinite(start_s) and math.isfinite(last_relative_s):
            self._start = start_s
            self._last_relative = last_relative_s

    def check(self, relative_s: float, absolute: datetime) -> datetime:
        """Return the wall-clock time to archive with the frame; raise `MediaError`
        ("timestamp") for a frame whose timing cannot be trusted."""
        if not math.isfinite(relative_s) or not 0 <= relative_s <= self.max_relative_s:
            raise MediaError("timestamp", f"relative {relative_s!r} out of range")
        if absolute.tzinfo is None:
            absolute = absolute.replace(tzinfo=UTC)
        start = absolute.timestamp() - relative_s
        if self._start is None or abs(start - self._start) <= self.tolerance_s:
            return self._accept(relative_s, start, absolute)
        last = self._last_relative
        if last is not None and abs(relative_s - last) <= self.tolerance_s:
            self.absolute_repaired += 1
            self._last_relative = max(last, relative_s)
            try:
                return _EPOCH + timedelta(seconds=self._start + relative_s)
            except OverflowError as exc:
                raise MediaError("timestamp", "absolute time out of range") from exc
        if self._candidate is not None and abs(start - self._candidate) <= self.tolerance_s:
            self._candidate_frames += 1
        else:
            self._candidate, self._candidate_frames = start, 1
        if self._candidate_frames >= REANCHOR_FRAMES:
            self.reanchors += 1
            return self._accept(relative_s, start, absolute)
        raise MediaError(
            "timestamp",
            f"relative {relative_s:.3f} s and absolute {absolute.isoformat()} disagree with "
            f"the stream's start by {start - self._start:.1f} s",
        )

    def _accept(self, relative_s: float, start: float, absolute: datetime) -> datetime:
        self._start = start
        self._last_relative = relative_s
        self._candidate, self._candidate_frames = None, 0
        return absolute
