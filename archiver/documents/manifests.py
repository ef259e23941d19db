"""The JSON documents that let consumers find, order, verify and play the archive.

A stream's `manifest.json` lists only segments (H.264) or batches (PNG) the store has
confirmed, in order; so does a recording's `events/manifest.json` for its events batches. Live
writes follow a budget (`WriteBudget`): with the reads and the final write, a stream's
manifest and playlist requests stay within `overhead_ratio` of all its requests, and a
live reader sees each segment listed within a bounded number of later ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import Field, asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

import orjson
import structlog

from archiver.layout import MediaFormat, RecordingId, StreamId
from archiver.segmenting.audio import SAMPLE_RATE, AudioSegment
from archiver.segmenting.fmp4 import MIN_GAP_TICKS, TIMESCALE, MediaSegment
from archiver.segmenting.png import MICROS, PngBatch
from archiver.values import RecordingContext

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
MAX_PARTICIPANT_CHANGES = 100
MAX_PARTICIPANT_CHANGES_BYTES = 256 * 1024
"""A manifest keeps the first and the latest participant changes within these."""
MERGE_ATTEMPTS = 5
JSON_TYPE = "application/json"
NOT_RECEIVED = "not_received"
"""The gap reason of frames a stream never got (the bot was disconnected)."""
GAP_TOLERANCE_S = 0.0001


def frame_interval_s(entry: dict[str, Any] | SegmentEntry) -> float:
    """The mean time between a segment's frames."""
    start, end, frames = (
        (entry["start"], entry["end"], entry["frames"])
        if isinstance(entry, dict)
        else (entry.start, entry.end, entry.frames)
    )
    return max(0.0, end - start) / max(1, frames)


def frames_after_missing_references(manifest: dict[str, Any]) -> int:
    """Listed frames that refer to pictures never received: from each `not_received` gap
    with `references_missing` to the next segment that starts with a key frame. They are
    archived as received, and decode with artefacts; a decoder may conceal some away."""
    segments: list[dict[str, Any]] = manifest.get("segments", [])
    missing = [
        gap["end"]
        for gap in manifest.get("gaps", [])
        if gap.get("reason") == NOT_RECEIVED and gap.get("references_missing")
    ]
    at_risk = 0
    for gap_end in missing:
        after = [s for s in segments if s["start"] >= gap_end - GAP_TOLERANCE_S]
        for segment in after:
            if segment is not after[0] and segment["starts_with_keyframe"]:
                break
            at_risk += segment["frames"]
    return at_risk


StreamStatus = Literal["live", "complete", "interrupted"]
_IDENTITY = ("bot", "recording", "realtime_endpoint", "video_separate", "audio_separate")
"""A manifest's fields that its first writer fixes."""


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _seconds(ticks: int) -> float:
    return round(ticks / TIMESCALE, 6)


def _micros_to_seconds(micros: int) -> float:
    return round(micros / MICROS, 6)


def dumps(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


def parse_document(raw: bytes, key: str) -> dict[str, Any] | None:
    """A stored JSON document; a corrupt one is logged and treated as absent."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        log.warning("previous_document_corrupt", key=key)
        return None
    return document


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
    continues: bool = False
    """Begins mid-GOP: decodes only after the segment listed before it (same init)."""

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
            continues=not segment.starts_with_keyframe,
        )


@dataclass(frozen=True, slots=True)
class PngFrameEntry:
    """One frame of a batch; fetch it alone with `Range: bytes=offset-(offset+size-1)`."""

    name: str
    relative: float
    absolute: str
    width: int
    height: int
    size: int
    offset: int


@dataclass(frozen=True, slots=True)
class PngBatchEntry:
    """One stored PNG tar batch as the manifest lists it."""

    key: str
    seq: int
    start: float
    end: float
    """The last frame's relative time (a PNG has no duration)."""
    start_wallclock: str
    frame_count: int
    bytes: int
    sha256: str
    frames: tuple[PngFrameEntry, ...]
    recovered: bool = False
    """True when rebuilt from the journal of a process that crashed."""

    @classmethod
    def stored(
        cls, batch: PngBatch, key: str, size: int, sha256: str, recovered: bool = False
    ) -> PngBatchEntry:
        return cls(
            key=key,
            seq=batch.seq,
            start=_micros_to_seconds(batch.start_micros),
            end=_micros_to_seconds(batch.end_micros),
            start_wallclock=batch.start_wallclock.isoformat(),
            frame_count=len(batch.frames),
            bytes=size,
            sha256=sha256,
            frames=tuple(
                PngFrameEntry(
                    name=frame.name,
                    relative=_micros_to_seconds(frame.micros),
                    absolute=frame.absolute.isoformat(),
                    width=frame.width,
                    height=frame.height,
                    size=frame.size,
                    offset=frame.offset,
                )
                for frame in batch.frames
            ),
            recovered=recovered,
        )

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> PngBatchEntry:
        frames = tuple(PngFrameEntry(**frame) for frame in document["frames"])
        return cls(**{**document, "frames": frames})


@dataclass(frozen=True, slots=True)
class AudioSegmentEntry:
    """One stored audio segment as the manifest lists it: samples `start_sample` up to
    `end_sample` of the recording's timeline at `SAMPLE_RATE`."""

    key: str
    init_key: str
    seq: int
    start: float
    end: float
    start_wallclock: str
    start_sample: int
    end_sample: int
    chunks: int
    codec: str
    bytes: int
    sha256: str
    silence_samples: int = 0
    """Samples of silence stored for short gaps and clock adjustments."""
    trimmed_samples: int = 0
    """Samples received and not stored (overlaps, clock adjustments)."""
    worst_placement_s: float = 0.0
    adjustments: tuple[dict[str, Any], ...] = ()
    """Where the sample clock was moved to follow the timestamps, and by how many samples."""
    recovered: bool = False
    """True when rebuilt from the journal of a process that crashed."""

    @classmethod
    def stored(
        cls,
        segment: AudioSegment,
        key: str,
        init_key: str,
        recovered: bool = False,
    ) -> AudioSegmentEntry:
        return cls(
            key=key,
            init_key=init_key,
            seq=segment.seq,
            start=round(segment.start_sample / SAMPLE_RATE, 6),
            end=round(segment.end_sample / SAMPLE_RATE, 6),
            start_wallclock=segment.start_wallclock.isoformat(),
            start_sample=segment.start_sample,
            end_sample=segment.end_sample,
            chunks=segment.chunks,
            codec=segment.codec,
            bytes=segment.size,
            sha256=segment.sha256,
            silence_samples=segment.silence_samples,
            trimmed_samples=segment.trimmed_samples,
            worst_placement_s=segment.worst_placement_s,
            adjustments=segment.adjustments,
            recovered=recovered,
        )

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> AudioSegmentEntry:
        known = {k: v for k, v in document.items() if k in _AUDIO_FIELDS}
        known["adjustments"] = tuple(known.get("adjustments", ()))
        return cls(**known)


_AUDIO_FIELDS = frozenset(AudioSegmentEntry.__dataclass_fields__)


class _Keyed(Protocol):
    @property
    def key(self) -> str: ...


_KeyedT = TypeVar("_KeyedT", bound=_Keyed)


def _unknown(entries: list[_KeyedT], known: set[str]) -> list[_KeyedT]:
    """The entries whose keys are not in `known`, each key once (the first)."""
    new = []
    for entry in entries:
        if entry.key not in known:
            known.add(entry.key)
            new.append(entry)
    return new


LIVE_SHARE = 0.8
"""Of the overhead share of requests, what live writes may take: the rest is kept for what
every stream writes anyway (its final listing, the read that resumes it) and its part of its
recording's `session.json` and events manifest."""


class WriteBudget:
    """Decides when a live manifest may be rewritten. The first listing goes out at once, so a
    reader finds a new stream. After it, the manifest's requests (each write with its
    playlist, if any) stay within `LIVE_SHARE` of `overhead_ratio` of all the stream's
    requests, and its bytes within `overhead_ratio` of its media bytes. As writes cost alike,
    that is one write per `requests per write / (LIVE_SHARE x ratio) - requests per write`
    media objects: a live reader sees each segment listed within 23 objects with a playlist
    at 10%, 12 without."""

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
        """Whether a manifest listing `entries` segments may be written now. The requests
        written so far stand for the live ones and the next (the first listing is not a live
        one; writes cost alike). The size is estimated from the last write, so the document is
        only built when it will be sent."""
        if self.manifest_requests == 0:
            return self.media_requests > 0
        estimated_size = self.last_size * entries // max(1, self.last_entries)
        share = LIVE_SHARE * self.ratio
        return (
            self.manifest_requests <= share * (self.media_requests + self.manifest_requests)
            and self.manifest_bytes + estimated_size <= self.ratio * self.media_bytes
        )

    def count_companion(self, size: int) -> None:
        """A document written with the manifest (a playlist) spends the same budget."""
        self.manifest_requests += 1
        self.manifest_bytes += size

    def count_manifest(self, size: int, entries: int) -> None:
        self.manifest_requests += 1
        self.manifest_bytes += size
        self.last_size = size
        self.last_entries = entries


class ManifestEntry(Protocol):
    """What every listed object has: the publisher orders by `seq`, recovery merges by `key`
    and `start`."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    @property
    def key(self) -> str: ...

    @property
    def seq(self) -> int: ...

    @property
    def start(self) -> float: ...

    @property
    def end(self) -> float: ...

    @property
    def recovered(self) -> bool: ...

    @property
    def start_wallclock(self) -> str: ...


EntryT = TypeVar("EntryT", bound=ManifestEntry)


class ArchiveManifest(ABC, Generic[EntryT]):
    """What the manifests of every format share: ids and metadata, the participant, status,
    counters, and the stored objects in order. Owned by its stream's publisher.

    The counters account for every frame: `received` = `archived` (the frames of the listed
    objects) + `pending` (held, queued or uploading; 0 once complete) + every `dropped_*`.
    Objects taken in from another writer or a crashed process count as received there.
    """

    entries_name: ClassVar[str]
    """The document's key for the list of stored objects."""

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
        self.participant_change_sizes: list[int] = []
        self.participant_changes_dropped = 0
        self.entries: list[EntryT] = []
        self.entry_documents: list[dict[str, Any]] = []
        self.carried_counters: dict[str, int] = {}
        self.recovered_ranges: list[dict[str, float]] = []
        self.gaps: list[dict[str, Any]] = []
        self.taken_in_frames = 0
        """Frames of objects listed by another writer or a crashed process."""
        self.identity_conflicts = 0
        """Runs that named other ids or metadata than the first writer's (kept)."""
        self.created_at = _now()
        self.status: StreamStatus = "live"
        if previous is not None:
            self._resume(previous)

    @abstractmethod
    def entry_from(self, document: dict[str, Any]) -> EntryT:
        """An entry back from its JSON form (a previous manifest, a spooled object's record)."""

    @staticmethod
    @abstractmethod
    def frames_of(entry: EntryT) -> int:
        """How many frames a listed object holds."""

    @abstractmethod
    def format_fields(self) -> dict[str, Any]:
        """The document's fields that only this format has."""

    def _resume(self, previous: dict[str, Any]) -> None:
        """Continue a manifest a previous connection or process wrote. Its ids and metadata
        stand (a later run that names others is counted, `identity_conflicts`), and its
        participant too: a different one is a change in `participant_changes`."""
        self._keep_identity(previous)
        if isinstance(previous.get("participant"), dict):
            self.participant = previous["participant"]
        self.created_at = previous.get("created_at", self.created_at)
        for change in previous.get("participant_changes", []):
            self._note_change(change)
        self.participant_changes_dropped += int(previous.get("participant_changes_dropped", 0))
        self.recovered_ranges = list(previous.get("recovered_ranges", []))
        self.gaps = list(previous.get("gaps", []))
        for document in previous.get(self.entries_name, []):
            self.add(self.entry_from(document))
        counters = previous.get("counters", {})
        carried = {k: v for k, v in counters.items() if isinstance(v, int)}
        listed = sum(self.frames_of(entry) for entry in self.entries)
        # What the previous writer still held is either recovered (and taken in as such) or
        # lost with it; either way it no longer counts as received here.
        pending = carried.pop("pending", 0)
        carried.pop("archived", None)
        if "received" in carried:
            carried["received"] -= pending
        else:
            dropped = sum(v for k, v in carried.items() if k.startswith("dropped_"))
            carried["received"] = listed + dropped
        self.carried_counters = carried

    def settled_gaps(self) -> list[dict[str, Any]]:
        """The gaps as the document lists them."""
        return self.gaps

    def take_gaps(self, theirs: object) -> None:
        """Another writer's gaps, each once (a gap is known by its reason and its end: the
        start of one not received may have settled since)."""
        if not isinstance(theirs, list):
            return
        known = {(gap.get("reason"), gap.get("end")) for gap in self.gaps}
        for gap in theirs:
            if isinstance(gap, dict) and (gap.get("reason"), gap.get("end")) not in known:
                known.add((gap.get("reason"), gap.get("end")))
                self.gaps.append(gap)
        self.gaps.sort(key=lambda gap: float(gap.get("start") or 0))

    def _keep_identity(self, previous: dict[str, Any]) -> None:
        stored = {
            name: previous[name]
            for name in _IDENTITY
            if name in previous and (previous[name] is None or isinstance(previous[name], dict))
        }
        conflicts = sum(stored[name] != getattr(self.context, name) for name in stored)
        if conflicts:
            self.identity_conflicts += conflicts
            log.warning("identity_kept", stream=str(self.stream), fields=conflicts)
            self.context = replace(self.context, **stored)

    def add(self, entry: EntryT) -> None:
        """List a stored object after those listed, numbered next; its document is built
        once, not at every write. One that starts earlier than the last listed (another
        writer's objects were merged in) takes its place in time order instead."""
        if self.entries and entry.start < self.entries[-1].start:
            self.merge([entry], taken_in=False)
            return
        if entry.seq != self.next_seq:
            entry = replace(entry, seq=self.next_seq)
        self.entries.append(entry)
        self.entry_documents.append(asdict(entry))

    def merge(self, entries: list[EntryT], taken_in: bool = True) -> int:
        """Add objects another writer or a crashed process listed, in time order,
        renumbering `seq`; return how many were not listed yet."""
        new = _unknown(entries, {entry.key for entry in self.entries})
        if not new:
            return 0
        if taken_in:
            self.taken_in_frames += sum(self.frames_of(entry) for entry in new)
        merged = sorted([*self.entries, *new], key=lambda entry: entry.start)
        self.entries, self.entry_documents = [], []
        for seq, entry in enumerate(merged):
            self.add(replace(entry, seq=seq))
        self.recovered_ranges.extend(
            {"start": entry.start, "end": entry.end} for entry in new if entry.recovered
        )
        self.recovered_ranges.sort(key=lambda r: r["start"])
        return len(new)

    @property
    def next_seq(self) -> int:
        return self.entries[-1].seq + 1 if self.entries else 0

    @property
    def listed(self) -> int:
        return len(self.entries)

    def listed_keys(self) -> set[str]:
        """The keys of every listed object (as `Spool.listed` takes them)."""
        return {entry.key for entry in self.entries}

    def update_participant(self, relative_s: float, participant: dict[str, Any]) -> None:
        if participant != self.participant:
            self.participant = participant
            self._note_change({"at": relative_s, "participant": participant})

    def _note_change(self, change: dict[str, Any]) -> None:
        """Keep the first change and the latest ones within a count and a size: details
        that flip back and forth must not grow the document without end."""
        self.participant_changes.append(change)
        self.participant_change_sizes.append(len(orjson.dumps(change)))
        while len(self.participant_changes) > 2 and (
            len(self.participant_changes) > MAX_PARTICIPANT_CHANGES
            or sum(self.participant_change_sizes) > MAX_PARTICIPANT_CHANGES_BYTES
        ):
            del self.participant_changes[1], self.participant_change_sizes[1]
            self.participant_changes_dropped += 1

    def document(self, counters: dict[str, int]) -> dict[str, Any]:
        merged = dict(self.carried_counters)
        for name, value in counters.items():
            merged[name] = merged.get(name, 0) + value
        merged["received"] = merged.get("received", 0) + self.taken_in_frames
        merged["archived"] = sum(self.frames_of(entry) for entry in self.entries)
        merged.setdefault("pending", 0)
        if self.identity_conflicts:
            merged["identity_conflicts"] = merged.get("identity_conflicts", 0) + (
                self.identity_conflicts
            )
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
            "participant_changes_dropped": self.participant_changes_dropped,
            "type": self.stream.source,
            "format": self.stream.media_format,
            "counters": merged,
            "recovered_ranges": self.recovered_ranges,
            "gaps": self.settled_gaps(),
            **self.format_fields(),
            # A copy: the document may be serialised on a thread while more are listed.
            self.entries_name: list(self.entry_documents),
        }


_SEGMENT_FIELDS = frozenset(SegmentEntry.__dataclass_fields__)


class StreamManifest(ArchiveManifest[SegmentEntry]):
    """The manifest of one H.264 stream: fMP4 segments, each behind its init segment."""

    entries_name = "segments"

    @property
    def segments(self) -> list[SegmentEntry]:
        return self.entries

    @property
    def last_ticks(self) -> int:
        return round(self.entries[-1].end * TIMESCALE) - 1 if self.entries else -1

    def entry_from(self, document: dict[str, Any]) -> SegmentEntry:
        return self.entry_from_document(document)

    @staticmethod
    def entry_from_document(document: dict[str, Any]) -> SegmentEntry:
        """Fields a later version adds are left out, so a rolling deploy's old and new
        writers can merge each other's listings."""
        return SegmentEntry(**{k: v for k, v in document.items() if k in _SEGMENT_FIELDS})

    def settled_gaps(self) -> list[dict[str, Any]]:
        """A frame range recorded as not received starts where the listing's frames before
        it end: a listing read while another writer was still storing its last segments
        may have recorded one those segments fill, whole or in part."""
        settled = []
        for gap in self.gaps:
            if gap.get("reason") == NOT_RECEIVED:
                before = [e for e in self.entries if e.start < gap["end"] - GAP_TOLERANCE_S]
                start = max([gap["start"], *(e.end for e in before)])
                filled_within = MIN_GAP_TICKS / TIMESCALE
                if before:
                    filled_within = max(filled_within, frame_interval_s(before[-1]) / 2)
                if gap["end"] - start <= filled_within:
                    continue
                gap = {**gap, "start": start}
            settled.append(gap)
        return settled

    @staticmethod
    def frames_of(entry: SegmentEntry) -> int:
        return entry.frames

    def format_fields(self) -> dict[str, Any]:
        return {
            "codec": self.entries[-1].codec if self.entries else None,
            "timescale": TIMESCALE,
        }


class PngManifest(ArchiveManifest[PngBatchEntry]):
    """The manifest of one PNG stream: tar batches, with every frame's place in its batch."""

    entries_name = "batches"

    @property
    def last_micros(self) -> int:
        return round(self.entries[-1].end * MICROS) if self.entries else -1

    def entry_from(self, document: dict[str, Any]) -> PngBatchEntry:
        return PngBatchEntry.from_document(document)

    @staticmethod
    def frames_of(entry: PngBatchEntry) -> int:
        return entry.frame_count

    def format_fields(self) -> dict[str, Any]:
        return {"frames": sum(entry.frame_count for entry in self.entries)}


class AudioManifest(ArchiveManifest[AudioSegmentEntry]):
    """The manifest of one participant's audio: fMP4 segments on the recording's timeline,
    each behind its init segment, with the gaps between them and every clock adjustment."""

    entries_name = "segments"

    @property
    def last_sample(self) -> int:
        """The last sample stored: a resumed stream places nothing at or before it."""
        return max((entry.end_sample for entry in self.entries), default=0) - 1

    def entry_from(self, document: dict[str, Any]) -> AudioSegmentEntry:
        return AudioSegmentEntry.from_document(document)

    @staticmethod
    def frames_of(entry: AudioSegmentEntry) -> int:
        return entry.chunks

    def format_fields(self) -> dict[str, Any]:
        return {
            "codec": self.entries[-1].codec if self.entries else self.stream.media_format,
            "sample_rate": SAMPLE_RATE,
            "channels": 1,
            "timescale": SAMPLE_RATE,
            "samples": sum(entry.end_sample - entry.start_sample for entry in self.entries),
            "worst_placement_s": max(
                (entry.worst_placement_s for entry in self.entries), default=0.0
            ),
            "adjustments": [a for entry in self.entries for a in entry.adjustments],
            "audio_separate": self.context.audio_separate,
        }


MANIFEST_TYPES: dict[MediaFormat, type[ArchiveManifest[Any]]] = {
    "h264": StreamManifest,
    "png": PngManifest,
    "flac": AudioManifest,
    "opus": AudioManifest,
}


@dataclass(frozen=True, slots=True)
class EventBatchEntry:
    """One stored batch of events: JSON Lines, one event per line, as received."""

    key: str
    seq: int
    count: int
    first_relative: float | None
    """The first timestamp an event of the batch carried, in seconds (None: none did)."""
    last_relative: float | None
    bytes: int
    sha256: str
    event_types: dict[str, int]
    recovered: bool = False
    """True when rebuilt from the journal of a process that crashed."""


class EventsManifest:
    """`events/manifest.json` of one recording: its events batches, in order, each listed
    only once the store confirmed it."""

    def __init__(self, recording: RecordingId, previous: dict[str, Any] | None = None) -> None:
        self.recording = recording
        self.bot: dict[str, Any] = {"id": recording.bot_id}
        self.recording_ref: dict[str, Any] = {"id": recording.recording_id}
        self.batches: list[EventBatchEntry] = []
        self.batch_documents: list[dict[str, Any]] = []
        self.carried_counters: dict[str, int] = {}
        self.created_at = _now()
        self.status: StreamStatus = "live"
        if previous is not None:
            self.created_at = previous.get("created_at", self.created_at)
            self.bot = previous.get("bot", self.bot)
            self.recording_ref = previous.get("recording", self.recording_ref)
            for document in previous.get("batches", []):
                self.add(EventBatchEntry(**document))
            counters = previous.get("counters", {})
            self.carried_counters = {k: v for k, v in counters.items() if isinstance(v, int)}

    def add(self, entry: EventBatchEntry) -> None:
        self.batches.append(entry)
        self.batch_documents.append(asdict(entry))

    @property
    def next_seq(self) -> int:
        return self.batches[-1].seq + 1 if self.batches else 0

    @property
    def listed(self) -> int:
        return len(self.batches)

    def listed_keys(self) -> set[str]:
        """The keys of every listed batch (as `Spool.listed` takes them)."""
        return {batch.key for batch in self.batches}

    def merge(self, entries: list[EventBatchEntry]) -> int:
        """Take in batches another writer or a crashed process listed, in key (time) order,
        renumbering `seq`; return how many were not listed yet."""
        new = _unknown(entries, {batch.key for batch in self.batches})
        if not new:
            return 0
        merged = sorted([*self.batches, *new], key=lambda batch: batch.key)
        self.batches, self.batch_documents = [], []
        for seq, entry in enumerate(merged):
            self.add(replace(entry, seq=seq))
        return len(new)

    @property
    def last_relative(self) -> float | None:
        """The latest timestamp any listed batch carried."""
        known = [b.last_relative for b in self.batches if b.last_relative is not None]
        return known[-1] if known else None

    def document(self, counters: dict[str, int]) -> dict[str, Any]:
        merged = dict(self.carried_counters)
        for name, value in counters.items():
            merged[name] = merged.get(name, 0) + value
        event_types: dict[str, int] = {}
        for batch in self.batches:
            for event, count in batch.event_types.items():
                event_types[event] = event_types.get(event, 0) + count
        return {
            "schema_version": SCHEMA_VERSION,
            "status": self.status,
            "created_at": self.created_at,
            "updated_at": _now(),
            "bot": self.bot,
            "recording": self.recording_ref,
            "counters": merged,
            "events": sum(batch.count for batch in self.batches),
            "event_types": event_types,
            # A copy: the document is serialised on a thread while the loop lists more.
            "batches": list(self.batch_documents),
        }
