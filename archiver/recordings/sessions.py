"""Each recording's `session.json`: who took part (and when the events say they joined and
left), every stream with its manifest, and the events archive.

`SessionIndex` is the document; `SessionWriter` keeps one per recording current in the
store, coalescing bursts of changes into conditional writes that keep what other writers
listed.

The document is bounded whatever the events say: a participant's details are stored once
(the latest, without their bulky fields past a size), joins and leaves keep the first and
the latest few with a count of those between, and participants first seen once the
document is at its size budget are counted, not listed. The events archive keeps
everything as received. A recording's index stays in memory only while something of it
is live or unwritten; a later change starts a new one, which merges with the stored
document on its first write (as a reconnect to another process does).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from archiver.documents.manifests import (
    SCHEMA_VERSION,
    ArchiveManifest,
    EventsManifest,
    StreamStatus,
    parse_document,
)
from archiver.documents.manifests import dumps as dump_json
from archiver.errors import InputError, StoreError
from archiver.layout import RecordingId, SpoolFolders, StreamId, local_name, safe_id
from archiver.recordings.notices import ReadyNotice
from archiver.settings import Settings
from archiver.store.documents import write_merging
from archiver.values import RecordingContext

if TYPE_CHECKING:
    from archiver.recordings.notices import ReadyNotices
    from archiver.store.spool import Spool

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
            "type": stream.video_type,
            "format": stream.media_format,
            "manifest_key": stream.manifest_key,
            "status": status,
        }
        if stream.media_format == "h264":
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


@dataclass(slots=True)
class _Session:
    """One recording's index in memory, and the state of its writes."""

    index: SessionIndex
    etag: str = ""
    """The stored version the next write replaces ("": none known)."""
    dirty: bool = False
    failed: bool = False
    holds: int = 0
    """Events logs of the recording that may still add to it."""
    task: asyncio.Task[None] | None = None
    grace: asyncio.TimerHandle | None = None
    """Ended, waiting out the grace before it completes."""
    changes: int = 0
    """Changes asked for so far: a completion gives way to any that arrives meanwhile."""


class _ReopenedElsewhere(Exception):
    """The stored document lists something live another task writes: not complete."""


def read_waiting(spool_dir: Path, take: bool = False) -> list[RecordingId]:
    """The recordings a process on this spool folder left waiting out their grace; `take`
    removes them (a dead worker's folder, whose recordings another one adopts)."""
    folder = SpoolFolders(spool_dir).waiting
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            ids = orjson.loads(path.read_bytes())
            found.append(
                RecordingId(
                    safe_id("bot_id", ids["bot_id"]),
                    safe_id("recording_id", ids["recording_id"]),
                )
            )
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, InputError):
            log.warning("waiting_entry_unreadable", file=path.name)
        if take:
            path.unlink(missing_ok=True)
    return found


def lists_live(document: dict[str, Any]) -> bool:
    """Whether a stored `session.json` lists a stream or events archive being written."""
    events = document.get("events")
    if isinstance(events, dict) and events.get("status") == "live":
        return True
    streams = document.get("streams")
    return isinstance(streams, list) and any(
        isinstance(stream, dict) and stream.get("status") == "live" for stream in streams
    )


class SessionWriter:
    """Keeps each recording's `session.json` current, coalescing bursts of changes into one
    write at a time per recording (serialised on a thread). Writes are conditional: what
    another connection, process or machine listed is kept. An index is dropped from memory
    once its last change is stored and nothing holds it or is live in it.

    With `notices`, an ended recording waits `recording_ready_grace_s` and then completes:
    unless something of it arrived meanwhile, here or (as the stored document tells) on
    another task, session.json says `complete` and `notices` announces it. Whatever arrives
    later reopens it; its next end completes it again, as the next of its `completions`.
    """

    def __init__(
        self,
        store: Spool,
        settings: Settings | None = None,
        notices: ReadyNotices | None = None,
        waiting_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.limits = SessionLimits() if settings is None else SessionLimits.from_settings(settings)
        self.sessions: dict[RecordingId, _Session] = {}
        self.writes: set[asyncio.Task[None]] = set()
        self.notices = notices
        self.waiting: dict[RecordingId, _Session] = {}
        """Ended recordings waiting out their grace: out of `sessions`, which holds only
        what is live or unwritten, until something of them arrives again."""
        self.waiting_dir = waiting_dir
        """Where each waiting recording has a small file, so that a process that starts on
        this spool after a crash completes them."""
        self.grace_s = 0.0 if settings is None else settings.recording_ready_grace_s
        self.draining = False
        """Recordings ending now were ended by this task's drain: their bots reconnect
        elsewhere, and that task completes them."""

    def record(
        self, stream: StreamId, manifest: ArchiveManifest[Any], status: StreamStatus
    ) -> None:
        entries = manifest.entries
        time_range = (entries[0].start, entries[-1].end) if entries else None
        self._session(stream.recording, active=status == "live").index.record_stream(
            stream, manifest.context, manifest.participant, status, time_range
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
        self._session(recording).index.record_presence(
            participant_id, participant, joined, timestamp
        )
        # One write at a time per recording takes in every change made meanwhile: a burst of
        # joins costs a few writes, and the spool holds the latest even through an outage.
        self._schedule(recording)

    def record_events(
        self, recording: RecordingId, manifest: EventsManifest, status: StreamStatus
    ) -> None:
        self._session(recording, active=status == "live").index.record_events(manifest, status)
        self._schedule(recording)

    def hold(self, recording: RecordingId) -> None:
        """An events log may add to this recording's index: keep it in memory."""
        self._session(recording).holds += 1

    def release(self, recording: RecordingId) -> None:
        session = self.sessions.get(recording)
        if session is not None:
            session.holds = max(0, session.holds - 1)
            if session.dirty and (session.task is None or session.task.done()):
                self._schedule(recording)
            self._forget_if_done(recording)

    def _session(self, recording: RecordingId, active: bool = True) -> _Session:
        """The recording's index, about to change; `active`: something of it arrived, so it
        is not complete until it ends again (a stream's final write is no such news)."""
        session = self.sessions.get(recording)
        if session is None:
            # Back within its grace, or later: a new index, merged with the stored one.
            self._stop_waiting(recording)
            session = self.sessions[recording] = _Session(SessionIndex(recording, self.limits))
        session.changes += 1
        if active:
            session.index.reopen()
        if session.grace is not None:
            session.grace.cancel()
            session.grace = None
        return session

    def _schedule(self, recording: RecordingId) -> None:
        session = self.sessions[recording]
        session.dirty = True
        if session.task is None or session.task.done():
            session.task = asyncio.create_task(
                self._write_while_dirty(recording, session), name=f"session {recording.prefix}"
            )
            self.writes.add(session.task)
            session.task.add_done_callback(self.writes.discard)

    async def _write_while_dirty(self, recording: RecordingId, session: _Session) -> None:
        """Write until the stored document has every change asked for: changes made during
        a write are taken by the next one, however many they were."""
        while session.dirty:
            session.dirty = False
            session.failed = not await self._write(recording, session)
            if session.failed:
                break
        self._forget_if_done(recording)

    async def _write(self, recording: RecordingId, session: _Session) -> bool:
        index = session.index

        async def render() -> bytes:
            document = index.document()  # built here: the loop owns the index
            return await asyncio.to_thread(dump_json, document)

        try:
            stored, _ = await write_merging(
                self.store, recording.session_key, session.etag, render, index.resume
            )
        except StoreError as exc:
            log.error("session_write_failed", recording=recording.prefix, error=str(exc))
            return False
        session.etag = stored.etag
        return True

    def _forget_if_done(self, recording: RecordingId) -> None:
        session = self.sessions.get(recording)
        if session is None or session.holds or session.dirty or session.failed:
            return
        writing = session.task is not None and not session.task.done()
        if writing and session.task is not asyncio.current_task():
            return
        if session.index.live:
            return
        del self.sessions[recording]
        if self.notices is not None and not session.index.complete and not self.draining:
            # Only the version it wrote waits: completing merges with the stored document.
            self._wait_out_grace(
                recording, _Session(SessionIndex(recording, self.limits), etag=session.etag)
            )

    def _wait_out_grace(self, recording: RecordingId, session: _Session) -> None:
        if self.draining:
            # Its file stays: a process that starts on this spool tries again.
            self.waiting.pop(recording, None)
            return
        if recording not in self.waiting:
            self._note_waiting(recording, True)
        self.waiting[recording] = session
        session.grace = asyncio.get_running_loop().call_later(
            self.grace_s, self._grace_over, recording, session
        )

    def _grace_over(self, recording: RecordingId, session: _Session) -> None:
        session.grace = None
        task = asyncio.create_task(
            self._complete(recording, session), name=f"complete {recording.prefix}"
        )
        self.writes.add(task)
        task.add_done_callback(self.writes.discard)

    async def _complete(self, recording: RecordingId, session: _Session) -> None:
        """Write session.json as complete and hand the notice on; give way to anything of
        the recording that arrived meanwhile, here or on another task."""
        assert self.notices is not None
        key = recording.session_key

        def still_waiting() -> bool:
            return self.waiting.get(recording) is session

        try:
            fetched = await self.store.fetch(key)
        except StoreError as exc:
            log.warning("recording_completion_deferred", recording=recording.prefix, error=str(exc))
            if still_waiting():
                self._wait_out_grace(recording, session)  # then tries again
            return
        if not still_waiting():
            return
        stored = None if fetched is None else parse_document(fetched[0], key)
        elsewhere = fetched is not None and fetched[1] != session.etag
        if stored is not None and elsewhere and lists_live(stored):
            log.info("recording_continues_elsewhere", recording=recording.prefix)
            self._stop_waiting(recording)
            return
        index = session.index
        before = (index.complete, index.completed_at, index.completions)
        index.mark_complete(stored)
        rendered: dict[str, Any] = {}

        async def render() -> bytes:
            rendered.clear()
            rendered.update(index.document())
            return await asyncio.to_thread(dump_json, rendered)

        def take_in(theirs: dict[str, Any]) -> None:
            if lists_live(theirs):
                raise _ReopenedElsewhere
            index.resume(theirs)

        try:
            written, _ = await write_merging(self.store, key, session.etag, render, take_in)
        except _ReopenedElsewhere:
            log.info("recording_continues_elsewhere", recording=recording.prefix)
            index.complete, index.completed_at, index.completions = before
            if still_waiting():
                self._stop_waiting(recording)
            return
        except StoreError as exc:
            log.error("session_write_failed", recording=recording.prefix, error=str(exc))
            index.complete, index.completed_at, index.completions = before
            if still_waiting():
                self._wait_out_grace(recording, session)
            return
        session.etag = written.etag
        log.info(
            "recording_complete", recording=recording.prefix, completion=rendered["completions"]
        )
        # Announced even if something arrived during the write: the recording was complete
        # when written, and what arrived reopens it for a next completion.
        self.notices.send(
            ReadyNotice(
                recording=recording,
                seq=rendered["completions"],
                session_key=self.store.location(key),
                streams=len(rendered["streams"]),
                time_range=index.time_range(),
                completed_at=rendered["completed_at"],
            )
        )
        if still_waiting():
            self._stop_waiting(recording)

    def _stop_waiting(self, recording: RecordingId) -> _Session | None:
        session = self.waiting.pop(recording, None)
        if session is not None:
            self._note_waiting(recording, False)
        return session

    def _note_waiting(self, recording: RecordingId, waiting: bool) -> None:
        """A few bytes, written on the loop: rare, and cheaper than a thread's hand-off."""
        if self.waiting_dir is None:
            return
        path = self.waiting_dir / f"{local_name(recording.prefix)}.json"
        try:
            if waiting:
                self.waiting_dir.mkdir(parents=True, exist_ok=True)
                ids = {"bot_id": recording.bot_id, "recording_id": recording.recording_id}
                path.write_bytes(orjson.dumps(ids))
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("waiting_list_failed", recording=recording.prefix, error=str(exc))

    def wait_again(self, recordings: list[RecordingId]) -> None:
        """Recordings a previous process on this spool left in their grace wait it out
        again here (from the start: whether a connection came back is unknown)."""
        for recording in recordings:
            if recording not in self.sessions and recording not in self.waiting:
                self._wait_out_grace(recording, _Session(SessionIndex(recording, self.limits)))
        if recordings:
            log.info("recordings_waiting_again", recordings=len(recordings))

    def drain(self) -> None:
        """This task stops: recordings waiting out their grace complete now (a bot that
        comes back to another task reopens its recording); those its drain ends do not."""
        self.draining = True
        for recording, session in list(self.waiting.items()):
            if session.grace is not None:
                session.grace.cancel()
                self._grace_over(recording, session)

    def tasks(self) -> list[asyncio.Task[None]]:
        return list(self.writes)

    def stop(self) -> None:
        """A shutdown past its deadline: no recording waiting out its grace completes here
        (its file stays, for the next process on this spool)."""
        self.draining = True
        for session in self.waiting.values():
            if session.grace is not None:
                session.grace.cancel()
                session.grace = None

    async def flush(self) -> None:
        """Wait for every write already asked for."""
        while self.writes:
            await asyncio.gather(*self.writes, return_exceptions=True)
