"""The JSON documents that let consumers find, order, verify and play the archive.

A stream's `manifest.json` lists only segments the store has confirmed, in order. Live
writes follow a budget: they may add at most `overhead_ratio` of the stream's own requests
and bytes, so a manifest that grows over a long meeting is rewritten less and less often.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from archiver.ingest.messages import RecordingContext
from archiver.layout import RecordingId, StreamId
from archiver.segmenting.fmp4 import TIMESCALE, MediaSegment

SCHEMA_VERSION = 1
JSON_TYPE = "application/json"

StreamStatus = Literal["live", "complete", "interrupted"]


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _seconds(ticks: int) -> float:
    return round(ticks / TIMESCALE, 6)


def dumps(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


@dataclass(frozen=True, slots=True)
class SegmentEntry:
    """One stored segment as the manifest lists it."""

    key: str
    init_key: str
    seq: int
    start: float
    end: float
    start_wallclock: str
    frames: int
    starts_with_keyframe: bool
    width: int
    height: int
    codec: str
    bytes: int
    sha256: str
    recovered: bool = False
    """True when rebuilt from the journal of a process that crashed."""

    @classmethod
    def stored(
        cls,
        segment: MediaSegment,
        key: str,
        init_key: str,
        size: int,
        sha256: str,
        recovered: bool = False,
    ) -> SegmentEntry:
        return cls(
            key=key,
            init_key=init_key,
            seq=segment.seq,
            start=_seconds(segment.start_ticks),
            end=_seconds(segment.end_ticks),
            start_wallclock=segment.start_wallclock.isoformat(),
            frames=segment.frames,
            starts_with_keyframe=segment.starts_with_keyframe,
            width=segment.config.width,
            height=segment.config.height,
            codec=segment.config.codec,
            bytes=size,
            sha256=sha256,
            recovered=recovered,
        )


class WriteBudget:
    """Decides when a live manifest may be rewritten without exceeding its overhead share."""

    def __init__(self, overhead_ratio: float) -> None:
        self.ratio = overhead_ratio
        self.media_requests = 0
        self.media_bytes = 0
        self.manifest_requests = 0
        self.manifest_bytes = 0
        self.last_size = 0
        self.last_entries = 0

    def count_media(self, size: int) -> None:
        self.media_requests += 1
        self.media_bytes += size

    def allows(self, entries: int) -> bool:
        """Whether a manifest listing `entries` segments may be written now. Its size is
        estimated from the last write, so the document is only built when it will be sent."""
        if self.manifest_requests == 0:
            return self.media_requests > 0
        estimated_size = self.last_size * entries // max(1, self.last_entries)
        return (
            self.manifest_requests + 1 <= self.ratio * self.media_requests
            and self.manifest_bytes + estimated_size <= self.ratio * self.media_bytes
        )

    def count_manifest(self, size: int, entries: int) -> None:
        self.manifest_requests += 1
        self.manifest_bytes += size
        self.last_size = size
        self.last_entries = entries


class StreamManifest:
    """The manifest of one stream, owned by that stream's publisher."""

    def __init__(
        self,
        stream: StreamId,
        context: RecordingContext,
        participant: dict[str, Any],
        previous: dict[str, Any] | None = None,
    ) -> None:
        self.stream = stream
        self.context = context
        self.participant = participant
        self.participant_changes: list[dict[str, Any]] = []
        self.segments: list[SegmentEntry] = []
        self.segment_documents: list[dict[str, Any]] = []
        self.carried_counters: dict[str, int] = {}
        self.recovered_ranges: list[dict[str, float]] = []
        self.created_at = _now()
        self.status: StreamStatus = "live"
        if previous is not None:
            self._resume(previous)

    def _resume(self, previous: dict[str, Any]) -> None:
        """Continue a manifest a previous connection or process wrote."""
        self.created_at = previous.get("created_at", self.created_at)
        self.participant_changes = list(previous.get("participant_changes", []))
        self.recovered_ranges = list(previous.get("recovered_ranges", []))
        for document in previous.get("segments", []):
            self.add(SegmentEntry(**document))
        counters = previous.get("counters", {})
        self.carried_counters = {k: v for k, v in counters.items() if isinstance(v, int)}

    def add(self, entry: SegmentEntry) -> None:
        """List a stored segment; its document is built once, not at every write."""
        self.segments.append(entry)
        self.segment_documents.append(asdict(entry))

    def merge(self, entries: list[SegmentEntry]) -> int:
        """Add segments a crashed process left behind, in time order, renumbering `seq`;
        return how many were not listed yet."""
        known = {entry.key for entry in self.segments}
        new = [entry for entry in entries if entry.key not in known]
        if not new:
            return 0
        merged = sorted([*self.segments, *new], key=lambda entry: entry.start)
        self.segments, self.segment_documents = [], []
        for seq, entry in enumerate(merged):
            self.add(replace(entry, seq=seq))
        self.recovered_ranges.extend(
            {"start": entry.start, "end": entry.end} for entry in new if entry.recovered
        )
        self.recovered_ranges.sort(key=lambda r: r["start"])
        return len(new)

    @property
    def next_seq(self) -> int:
        return self.segments[-1].seq + 1 if self.segments else 0

    @property
    def last_ticks(self) -> int:
        return round(self.segments[-1].end * TIMESCALE) - 1 if self.segments else -1

    def update_participant(self, relative_s: float, participant: dict[str, Any]) -> None:
        if participant != self.participant:
            self.participant = participant
            self.participant_changes.append({"at": relative_s, "participant": participant})

    def document(self, counters: dict[str, int]) -> dict[str, Any]:
        merged = dict(self.carried_counters)
        for name, value in counters.items():
            merged[name] = merged.get(name, 0) + value
        return {
            "schema_version": SCHEMA_VERSION,
            "status": self.status,
            "created_at": self.created_at,
            "updated_at": _now(),
            "bot": self.context.bot,
            "recording": self.context.recording,
            "realtime_endpoint": self.context.realtime_endpoint,
            "video_separate": self.context.video_separate,
            "participant": self.participant,
            "participant_changes": self.participant_changes,
            "type": self.stream.video_type,
            "format": self.stream.media_format,
            "codec": self.segments[-1].codec if self.segments else None,
            "timescale": TIMESCALE,
            "counters": merged,
            "recovered_ranges": self.recovered_ranges,
            "segments": self.segment_documents,
        }


class SessionIndex:
    """`session.json` of one recording: its participants and their streams."""

    def __init__(self, recording: RecordingId) -> None:
        self.recording = recording
        self.context: RecordingContext | None = None
        self.participants: dict[str, dict[str, Any]] = {}
        self.streams: dict[str, dict[str, Any]] = {}

    def record_stream(
        self,
        stream: StreamId,
        context: RecordingContext,
        participant: dict[str, Any],
        status: StreamStatus,
    ) -> None:
        self.context = context
        self.participants[stream.participant_id] = participant
        self.streams[stream.manifest_key] = {
            "participant_id": stream.participant_id,
            "type": stream.video_type,
            "format": stream.media_format,
            "manifest_key": stream.manifest_key,
            "status": status,
        }

    def document(self) -> dict[str, Any]:
        context = self.context
        return {
            "schema_version": SCHEMA_VERSION,
            "updated_at": _now(),
            "bot": context.bot if context else {"id": self.recording.bot_id},
            "recording": context.recording if context else {"id": self.recording.recording_id},
            "participants": [
                {"id": pid, **{k: v for k, v in info.items() if k != "id"}}
                for pid, info in sorted(self.participants.items())
            ],
            "streams": [self.streams[k] for k in sorted(self.streams)],
        }
