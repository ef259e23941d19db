"""`session.json`, the index of one recording: who took part (and when the events say they
joined and left), every stream with its manifest, and the events archive.

The document is bounded whatever the events say: a participant's details are stored once
(the latest, without their bulky fields past a size), joins and leaves keep the first and
the latest few with a count of those between, and participants first seen once the
document is at its size budget are counted, not listed. The events archive keeps
everything as received. `archiver.recordings.sessions` keeps it current in the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

from archiver.documents.manifests import (
    SCHEMA_VERSION,
    EventsManifest,
    StreamStatus,
)
from archiver.layout import RecordingId, StreamId
from archiver.settings import Settings
from archiver.values import RecordingContext

log = structlog.get_logger(__name__)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


_PRESENCE = ("joins", "leaves")
_SHORT_TEXT = 256
"""Longest string a truncated participant's details keep."""
_PRESENCE_ENTRY_BYTES = 100
"""What one kept join or leave adds to the document, about (indented JSON)."""


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """How large one recording's `session.json` may grow (see `Settings`)."""

    presence_entries: int = 20
    details_bytes: int = 4096
    max_bytes: int = 1024 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionLimits:
        return cls(
            presence_entries=settings.session_presence_entries,
            details_bytes=settings.session_participant_details_bytes,
            max_bytes=settings.session_max_bytes,
        )


def _short(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= _SHORT_TEXT
    return value is None or isinstance(value, bool | int | float)


def bounded_details(participant: dict[str, Any], limit: int) -> tuple[dict[str, Any], int]:
    """The participant's details as session.json keeps them, and their size: whole when
    small, else only their short scalar fields, marked `details_truncated`."""
    size = len(orjson.dumps(participant))
    if size <= limit:
        return participant, size
    kept: dict[str, Any] = {}
    budget = limit - 64
    for name, value in participant.items():
        if isinstance(name, str) and _short(value):
            cost = len(name) + len(str(value)) + 8
            if cost > budget:
                break
            budget -= cost
            kept[name] = value
    kept["details_truncated"] = True
    return kept, len(orjson.dumps(kept))


def bounded_timestamp(timestamp: Any) -> Any:
    """A join's or leave's timestamp as the event carried it, less anything but the
    `relative` and `absolute` times."""
    if isinstance(timestamp, dict):
        return {
            k: timestamp[k]
            for k in ("relative", "absolute")
            if k in timestamp and _short(timestamp[k])
        }
    return timestamp if _short(timestamp) else None


class SessionIndex:
    """`session.json` of one recording: its participants (with their joins and leaves as the
    events tell them), their streams, and its events archive."""

    def __init__(self, recording: RecordingId, limits: SessionLimits | None = None) -> None:
        self.recording = recording
        self.limits = limits or SessionLimits()
        self.context: RecordingContext | None = None
        self.refs: dict[str, dict[str, Any]] = {}
        self.stored_refs: dict[str, dict[str, Any]] = {}
        """The bot's and recording's ids and metadata as first stored: they stand."""
        self.participants: dict[str, dict[str, Any]] = {}
        self.details_bytes: dict[str, int] = {}
        self.presence: dict[str, dict[str, list[Any]]] = {}
        self.dropped: dict[str, dict[str, int]] = {}
        """Joins and leaves between the first and the latest kept, per participant."""
        self.size = 0
        """About what the participants weigh in the document."""
        self.omitted = 0
        """Updates about participants not listed: the document was at its size budget."""
        self.streams: dict[str, dict[str, Any]] = {}
        self.events: dict[str, Any] | None = None
        self.own: set[str] = set()
        """Streams and events manifests this process writes: what it lists of the others
        follows their latest stored word."""
        self.complete: bool | None = None
        """Whether the recording has ended for good; None: as the stored document says."""
        self.completed_at: str | None = None
        self.completions = 0
        """How often the recording completed: a connection that came back reopens it."""
        self.active_at: datetime | None = None
        """When something of the recording last arrived here (a stream opened, events)."""

    @property
    def live(self) -> bool:
        """Whether a stream or the events archive this process writes is still live."""
        if self.events is not None and self.events.get("status") == "live":
            return self.recording.events_manifest_key in self.own
        return any(
            stream.get("status") == "live" and key in self.own
            for key, stream in self.streams.items()
        )

    def _keep_participant(self, participant_id: str, participant: dict[str, Any]) -> bool:
        """Store the participant's (bounded) details; False when the document has no room
        left for one more participant."""
        details, size = bounded_details(participant, self.limits.details_bytes)
        known = participant_id in self.participants
        if not known and self.size + size > self.limits.max_bytes:
            self.omitted += 1
            return False
        self.size += size - self.details_bytes.get(participant_id, 0)
        self.participants[participant_id] = details
        self.details_bytes[participant_id] = size
        return True

    def record_stream(
        self,
        stream: StreamId,
        context: RecordingContext,
        participant: dict[str, Any],
        status: StreamStatus,
        time_range: tuple[float, float] | None = None,
    ) -> None:
        self.context = context
        self._keep_participant(stream.participant_id, participant)
        entry: dict[str, Any] = {
            "participant_id": stream.participant_id,
            "type": stream.source,
            "format": stream.media_format,
            "manifest_key": stream.manifest_key,
            "status": status,
        }
        if stream.media_format != "png":
            entry["playlist_key"] = stream.playlist_key
        if time_range is not None:
            entry["start"], entry["end"] = time_range
        self.streams[stream.manifest_key] = entry
        self.own.add(stream.manifest_key)

    def record_presence(
        self, participant_id: str, participant: dict[str, Any], joined: bool, timestamp: Any
    ) -> None:
        """Note a join or leave, with the timestamp the event carried."""
        if not self._keep_participant(participant_id, participant):
            return
        kind = "joins" if joined else "leaves"
        times = self._presence(participant_id)[kind]
        times.append(bounded_timestamp(timestamp))
        self.size += _PRESENCE_ENTRY_BYTES
        self._cap(participant_id, kind)

    def _presence(self, participant_id: str) -> dict[str, list[Any]]:
        presence = self.presence.get(participant_id)
        if presence is None:
            presence = self.presence[participant_id] = {"joins": [], "leaves": []}
            self.dropped[participant_id] = {"joins": 0, "leaves": 0}
        return presence

    def _cap(self, participant_id: str, kind: str) -> None:
        """Keep the first and the latest: a participant who keeps rejoining stays one line
        of the document, with the count of what is between."""
        times = self.presence[participant_id][kind]
        excess = len(times) - self.limits.presence_entries
        if excess > 0:
            del times[1 : 1 + excess]
            self.dropped[participant_id][kind] += excess
            self.size -= excess * _PRESENCE_ENTRY_BYTES

    def record_events(self, manifest: EventsManifest, status: StreamStatus) -> None:
        self.refs = {"bot": manifest.bot, "recording": manifest.recording_ref}
        self.events = {
            "manifest_key": self.recording.events_manifest_key,
            "status": status,
            "batches": len(manifest.batches),
            "events": sum(batch.count for batch in manifest.batches),
        }
        self.own.add(self.recording.events_manifest_key)

    def resume(self, previous: dict[str, Any]) -> None:
        """Keep what a previous connection or process listed and this one has not seen."""
        self.refs = self.refs or {
            name: previous[name] for name in ("bot", "recording") if name in previous
        }
        for name in ("bot", "recording"):
            if isinstance(previous.get(name), dict):
                self.stored_refs.setdefault(name, previous[name])
        for stream in previous.get("streams", []):
            key = stream.get("manifest_key") if isinstance(stream, dict) else None
            if isinstance(key, str) and key not in self.own:
                self.streams[key] = stream
        for entry in previous.get("participants", []):
            if not isinstance(entry, dict):
                continue
            participant_id = str(entry.get("id"))
            if participant_id not in self.participants:
                info = {
                    k: v
                    for k, v in entry.items()
                    if k not in _PRESENCE and not k.endswith("_dropped")
                }
                if not self._keep_participant(participant_id, info):
                    continue
            presence = self._presence(participant_id)
            for kind in _PRESENCE:
                earlier = [t for t in entry.get(kind, []) if t not in presence[kind]]
                presence[kind][:0] = earlier
                self.size += len(earlier) * _PRESENCE_ENTRY_BYTES
                carried = entry.get(f"{kind}_dropped")
                if isinstance(carried, int):
                    self.dropped[participant_id][kind] = max(
                        self.dropped[participant_id][kind], carried
                    )
                self._cap(participant_id, kind)
        carried_omitted = previous.get("participant_updates_omitted")
        if isinstance(carried_omitted, int):
            self.omitted = max(self.omitted, carried_omitted)
        theirs = previous.get("events")
        if isinstance(theirs, dict) and self.recording.events_manifest_key not in self.own:
            self.events = theirs
        carried_completions = previous.get("completions")
        if isinstance(carried_completions, int):
            self.completions = max(self.completions, carried_completions)
        if previous.get("complete") is True and not self.complete:
            # Completed elsewhere: it holds unless something arrived here since (a stream
            # ending here late is no news; one opening is).
            completed_at = _parse_time(previous.get("completed_at"))
            if self.complete is None or (
                completed_at is not None
                and (self.active_at is None or completed_at >= self.active_at)
            ):
                self.complete = True
                self.completed_at = previous.get("completed_at")
        elif self.complete is None:
            self.complete = False

    def reopen(self) -> None:
        """Something of the recording arrived: it is not complete (again) until it ends."""
        self.complete = False
        self.completed_at = None
        self.active_at = datetime.now(UTC)

    def mark_complete(self, stored: dict[str, Any] | None) -> None:
        """Complete the recording, as the next of its completions; or, when the stored
        document (another task's) says it completed since anything arrived here, as that
        one: both tasks then claim the same notice, and one sends it."""
        if stored is not None:
            self.resume(stored)
        if self.complete:
            return
        self.completions += 1
        self.complete = True
        self.completed_at = _now()

    def time_range(self) -> tuple[float, float] | None:
        """From the earliest stream start to the latest stream end (relative seconds)."""
        spans = [
            (s["start"], s["end"])
            for s in self.streams.values()
            if isinstance(s.get("start"), int | float) and isinstance(s.get("end"), int | float)
        ]
        if not spans:
            return None
        return min(start for start, _ in spans), max(end for _, end in spans)

    def _participant(self, participant_id: str, info: dict[str, Any]) -> dict[str, Any]:
        entry = {"id": participant_id, **{k: v for k, v in info.items() if k != "id"}}
        presence = self.presence.get(participant_id)
        if presence is not None:
            dropped = self.dropped[participant_id]
            for kind in _PRESENCE:
                entry[kind] = list(presence[kind])
                if dropped[kind]:
                    entry[f"{kind}_dropped"] = dropped[kind]
        return entry

    def document(self) -> dict[str, Any]:
        """The document as it stands, in fresh containers: it can be serialised on a thread
        while the loop goes on changing the index."""
        context = self.context
        # The first writer's ids and metadata stand: a later connection cannot rename them.
        refs = {
            **self.stored_refs,
            **{k: v for k, v in self.refs.items() if k not in self.stored_refs},
        }
        bot = refs.get("bot") or (context.bot if context else {"id": self.recording.bot_id})
        recording = refs.get("recording") or (
            context.recording if context else {"id": self.recording.recording_id}
        )
        document = {
            "schema_version": SCHEMA_VERSION,
            "updated_at": _now(),
            "bot": bot,
            "recording": recording,
            "participants": [
                self._participant(pid, info) for pid, info in sorted(self.participants.items())
            ],
            "streams": [dict(self.streams[k]) for k in sorted(self.streams)],
            "events": None if self.events is None else dict(self.events),
            "complete": self.complete is True,
            "completed_at": self.completed_at if self.complete else None,
            "completions": self.completions,
        }
        if self.omitted:
            document["participant_updates_omitted"] = self.omitted
        return document


def lists_live(document: dict[str, Any]) -> bool:
    """Whether a stored `session.json` lists a stream or events archive being written."""
    events = document.get("events")
    if isinstance(events, dict) and events.get("status") == "live":
        return True
    streams = document.get("streams")
    return isinstance(streams, list) and any(
        isinstance(stream, dict) and stream.get("status") == "live" for stream in streams
    )
