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

A new stream has no start to check its first frame against, and the segmenters keep time
running forward, so a first frame trusted blindly would set the timeline for the whole
stream (a first `relative` days off would push every later frame behind it). The first
frames are therefore held, not muxed, until two of them agree on the start, which is
usually the second frame; held frames are then judged against that start like any other.
Holding at the guard rather than cutting the segmenter's timeline afterwards means a bad
first frame never reaches a segment, a journal or a manifest; once the start is known a
frame costs the same checks as before and one small result object. At most `HOLD_FRAMES`
are held: should none of them agree (every `absolute` wrong), or the stream end first,
the first held frame sets the start as it always did. Later, once `REANCHOR_FRAMES`
frames in a row agree with each other but not with the start (a resumed stream whose
archived start was wrong), they become the start (`timestamp_reanchors`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Generic, NamedTuple, TypeVar

from archiver.errors import MediaError

REANCHOR_FRAMES = 3
HOLD_FRAMES = 4
"""How many first frames a new stream holds, at most, while no two agree on its start."""
_EPOCH = datetime.fromtimestamp(0, UTC)

T = TypeVar("T")


class Timed(NamedTuple, Generic[T]):
    """A frame the guard has judged: archive it at `relative_s` and `absolute`, or, with
    `error`, count it as dropped. A tuple: one is made for every frame."""

    item: T
    relative_s: float
    absolute: datetime
    error: MediaError | None = None


@dataclass(frozen=True, slots=True)
class _Held(Generic[T]):
    item: T
    relative_s: float
    absolute: datetime
    start: float


class TimestampGuard(Generic[T]):
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
        self._held: list[_Held[T]] = []

    @property
    def held_frames(self) -> int:
        """First frames waiting for the stream's start to be confirmed."""
        return len(self._held)

    def seed(self, start_s: float, last_relative_s: float) -> None:
        """Continue a stream whose earlier frames are archived: its start is known."""
        if math.isfinite(start_s) and math.isfinite(last_relative_s):
            self._start = start_s
            self._last_relative = last_relative_s

    def admit(self, item: T, relative_s: float, absolute: datetime) -> list[Timed[T]]:
        """Judge one frame; return, in order, the frames now judged: none while the first
        frames are held, this one alone once the start is known. Raise `MediaError`
        ("timestamp") for a `relative` out of range, which is never held."""
        if self._start is not None:
            try:
                return [Timed(item, relative_s, self.check(relative_s, absolute))]
            except MediaError as exc:
                return [Timed(item, relative_s, absolute, exc)]
        absolute = self._in_range(relative_s, absolute)
        start = absolute.timestamp() - relative_s
        for earlier in self._held:
            if abs(start - earlier.start) <= self.tolerance_s:
                self._start, self._last_relative = earlier.start, earlier.relative_s
                break
        self._held.append(_Held(item, relative_s, absolute, start))
        if self._start is None and len(self._held) < HOLD_FRAMES:
            return []
        return self.release()

    def release(self) -> list[Timed[T]]:
        """The held frames, judged against the start (the first held frame's, when none was
        confirmed): at stream end, or when the hold is full."""
        held, self._held = self._held, []
        return [self._judge(h.item, h.relative_s, h.absolute) for h in held]

    def _judge(self, item: T, relative_s: float, absolute: datetime) -> Timed[T]:
        try:
            return Timed(item, relative_s, self.check(relative_s, absolute))
        except MediaError as exc:
            return Timed(item, relative_s, absolute, exc)

    def _in_range(self, relative_s: float, absolute: datetime) -> datetime:
        if not math.isfinite(relative_s) or not 0 <= relative_s <= self.max_relative_s:
            raise MediaError("timestamp", f"relative {relative_s!r} out of range")
        return absolute if absolute.tzinfo is not None else absolute.replace(tzinfo=UTC)

    def check(self, relative_s: float, absolute: datetime) -> datetime:
        """Return the wall-clock time to archive with the frame; raise `MediaError`
        ("timestamp") for a frame whose timing cannot be trusted. Without a start, the frame
        sets it."""
        absolute = self._in_range(relative_s, absolute)
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
