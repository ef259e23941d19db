"""What every segmenter offers the stream worker, whatever the format it turns into objects."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol, TypeVar


class SegmentJournal(Protocol):
    """Where the frames of the open segment are kept until the segment is safely stored."""

    def begin(self, name: str, config: dict[str, Any] | None) -> None: ...

    def record(self, relative_s: float, absolute: datetime, data: bytes) -> None: ...


class Finished(Protocol):
    """A closed segment or batch, ready to store."""

    @property
    def seq(self) -> int: ...

    @property
    def name(self) -> str:
        """Its time-ordered name, shared by its journal file."""
        ...


FinishedT = TypeVar("FinishedT", bound=Finished)


class Segmenter(Protocol[FinishedT]):
    """Turns one stream's frames into finished objects; owned by one worker at a time, so the
    stream worker can run any format on its threads the same way."""

    journal: SegmentJournal | None

    def push(self, data: bytes, relative_s: float, absolute: datetime) -> list[FinishedT]:
        """Add one frame; return what it closed. Raise `MediaError` for a frame that cannot be
        archived (it is counted)."""
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
