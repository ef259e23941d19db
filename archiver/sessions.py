"""Each recording's `session.json`: who took part (and when the events say they joined and
left), every stream with its manifest, and the events archive.

`SessionIndex` is the document; `SessionWriter` keeps one per recording current in the
store, coalescing bursts of changes into conditional writes that keep what other writers
listed.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from archiver.errors import StoreError
from archiver.ingest.messages import RecordingContext
from archiver.layout import RecordingId, StreamId
from archiver.manifests import (
    SCHEMA_VERSION,
    ArchiveManifest,
    EventsManifest,
    StreamStatus,
    write_merging,
)
from archiver.manifests import dumps as dump_json

if TYPE_CHECKING:
    from archiver.store.spool import Spool

log = structlog.get_logger(__name__)


def _now() -> str:
    return datetime.now(UTC).isoformat()


class SessionIndex:
    """`session.json` of one recording: its participants (with their joins and leaves as the
    events tell them), their streams, and its events archive."""

    def __init__(self, recording: RecordingId) -> None:
        self.recording = recording
        self.context: RecordingContext | None = None
        self.refs: dict[str, dict[str, Any]] = {}
        self.participants: dict[str, dict[str, Any]] = {}
        self.presence: dict[str, dict[str, list[Any]]] = {}
        self.streams: dict[str, dict[str, Any]] = {}
        self.events: dict[str, Any] | None = None

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

    def record_presence(
        self, participant_id: str, participant: dict[str, Any], joined: bool, timestamp: Any
    ) -> None:
        """Note a join or leave, with the timestamp the event carried."""
        self.participants[participant_id] = participant
        presence = self.presence.setdefault(participant_id, {"joins": [], "leaves": []})
        presence["joins" if joined else "leaves"].append(timestamp)

    def record_events(self, manifest: EventsManifest, status: StreamStatus) -> None:
        self.refs = {"bot": manifest.bot, "recording": manifest.recording_ref}
        self.events = {
            "manifest_key": self.recording.events_manifest_key,
            "status": status,
            "batches": len(manifest.batches),
            "events": sum(batch.count for batch in manifest.batches),
        }

    def resume(self, previous: dict[str, Any]) -> None:
        """Keep what a previous connection or process listed and this one has not seen."""
        self.refs = self.refs or {
            name: previous[name] for name in ("bot", "recording") if name in previous
        }
        for stream in previous.get("streams", []):
            self.streams.setdefault(stream["manifest_key"], stream)
        for entry in previous.get("participants", []):
            participant_id = str(entry.get("id"))
            info = {k: v for k, v in entry.items() if k not in ("joins", "leaves")}
            self.participants.setdefault(participant_id, info)
            presence = self.presence.setdefault(participant_id, {"joins": [], "leaves": []})
            for kind in ("joins", "leaves"):
                earlier = [t for t in entry.get(kind, []) if t not in presence[kind]]
                presence[kind][:0] = earlier
        if self.events is None:
            self.events = previous.get("events")

    def document(self) -> dict[str, Any]:
        context = self.context
        refs = self.refs
        bot = context.bot if context else refs.get("bot", {"id": self.recording.bot_id})
        recording = (
            context.recording
            if context
            else refs.get("recording", {"id": self.recording.recording_id})
        )
        return {
            "schema_version": SCHEMA_VERSION,
            "updated_at": _now(),
            "bot": bot,
            "recording": recording,
            "participants": [
                {
                    "id": pid,
                    **{k: v for k, v in info.items() if k != "id"},
                    **self.presence.get(pid, {}),
                }
                for pid, info in sorted(self.participants.items())
            ],
            "streams": [self.streams[k] for k in sorted(self.streams)],
            "events": self.events,
        }


class SessionWriter:
    """Keeps each recording's `session.json` current, coalescing bursts of changes. Writes
    are conditional: what another connection, process or machine listed is kept."""

    def __init__(self, store: Spool) -> None:
        self.store = store
        self.indexes: dict[RecordingId, SessionIndex] = {}
        self.locks: dict[RecordingId, asyncio.Lock] = {}
        self.versions: dict[RecordingId, tuple[int, int]] = {}
        self.etags: dict[RecordingId, str] = {}
        self.writes: set[asyncio.Task[None]] = set()

    def record(
        self, stream: StreamId, manifest: ArchiveManifest[Any], status: StreamStatus
    ) -> None:
        self._index(stream.recording).record_stream(
            stream, manifest.context, manifest.participant, status
        )
        self._schedule(stream.recording)

    def record_presence(
        self,
        recording: RecordingId,
        participant_id: str,
        participant: dict[str, Any],
        joined: bool,
        timestamp: Any,
    ) -> None:
        self._index(recording).record_presence(participant_id, participant, joined, timestamp)
        self._schedule(recording)

    def record_events(
        self, recording: RecordingId, manifest: EventsManifest, status: StreamStatus
    ) -> None:
        self._index(recording).record_events(manifest, status)
        self._schedule(recording)

    def _index(self, recording: RecordingId) -> SessionIndex:
        if recording not in self.indexes:
            self.indexes[recording] = SessionIndex(recording)
            self.locks[recording] = asyncio.Lock()
        return self.indexes[recording]

    def _schedule(self, recording: RecordingId) -> None:
        wanted, written = self.versions.get(recording, (0, 0))
        self.versions[recording] = (wanted + 1, written)
        task = asyncio.create_task(self._write(recording))
        self.writes.add(task)
        task.add_done_callback(self.writes.discard)

    async def _write(self, recording: RecordingId) -> None:
        async with self.locks[recording]:
            wanted, written = self.versions[recording]
            if written == wanted:
                return
            index = self.indexes[recording]
            try:
                stored, _ = await write_merging(
                    self.store,
                    recording.session_key,
                    self.etags.get(recording, ""),
                    lambda: dump_json(index.document()),
                    index.resume,
                )
            except StoreError as exc:
                log.error("session_write_failed", recording=recording.prefix, error=str(exc))
                return
            self.etags[recording] = stored.etag
            self.versions[recording] = (self.versions[recording][0], wanted)

    async def flush(self) -> None:
        """Wait for every write already asked for."""
        while self.writes:
            await asyncio.gather(*self.writes, return_exceptions=True)
