"""What every segmenter offers the stream worker, whatever the format it turns into objects."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, Protocol, TypeVar


class SegmentJournal(Protocol):
    """Where the frames of the open segment are kept until the segment is safely stored."""

    def begin(self, name: str, config: dict[str, Any] | None) -> None: ...

    def record(self, relative_s: float, absolute: datetime, data: bytes) -> None: ...


@dataclass(slots=True)
class DropCounters:
    """What a segmenter did not archive, and why; every format adds its own fields. Frames
    it holds or has closed are counted by the stream, which knows when they are listed."""

    dropped_invalid: int = 0
    timestamps_adjusted: int = 0
    segmenter_resets: int = 0
    drop_reasons: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, frames: int = 1) -> None:
        self.dropped_invalid += frames
        self.drop_reasons[reason] = self.drop_reasons.get(reason, 0) + frames

    def snapshot(self) -> dict[str, int]:
        """Flat copy for the manifest: one `invalid_<reason>` entry per drop reason."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "drop_reasons"}
        flat.update({f"invalid_{reason}": n for reason, n in self.drop_reasons.items()})
        return flat


class Finished(Protocol):
    """A closed segment or batch, ready to store."""

    @property
    def seq(self) -> int: ...

    @property
    def name(self) -> str:
        """Its time-ordered name, shared by its journal file."""
        ...

    @property
    def frame_count(self) -> int: ...


FinishedT = TypeVar("FinishedT", bound=Finished)


class Segmenter(Protocol[FinishedT]):
    """Turns one stream's frames into finished objects; owned by one worker at a time, so the
    stream worker can run any format on its threads the same way."""

    journal: SegmentJournal | None
    gaps: list[dict[str, Any]]
    """Time ranges lost (to a failure of ours, or never received), completed and not yet
    taken by the stream."""

    @property
    def held_frames(self) -> int:
        """Frames taken into the open segment or batch, not yet in a finished one."""
        ...

    def push(self, data: bytes, relative_s: float, absolute: datetime) -> list[FinishedT]:
        """Add one frame; return what it closed. Raise `MediaError` for a frame that cannot be
        archived (it is counted), `SegmenterFailure` when the segmenter failed on it (what it
        held comes back salvaged)."""
        ...

    def flush(self) -> list[FinishedT]:
        """Close what is open, at stream end."""
        ...

    def reject(self, reason: str) -> None:
        """Count a frame that never reached the segmenter, by why."""
        ...

    def snapshot(self) -> dict[str, int]:
        """The counters, flat, for the manifest."""
        ...
