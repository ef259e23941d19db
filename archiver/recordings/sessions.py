"""Each recording's `session.json` kept current in the store (`SessionWriter`), and the
grace after a recording ends before it is marked complete.

`archiver.documents.sessions.SessionIndex` is the document; the writer keeps one per
recording, coalescing bursts of changes into conditional writes that keep what other writers
listed. A recording's index stays in memory only while something of it is live or
unwritten; a later change starts a new one, which merges with the stored
document on its first write (as a reconnect to another process does).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from archiver.documents.manifests import (
    ArchiveManifest,
    EventsManifest,
    StreamStatus,
    parse_document,
)
from archiver.documents.manifests import dumps as dump_json
from archiver.documents.playlists import CONTENT_TYPE as PLAYLIST_TYPE
from archiver.documents.playlists import render_participant_playlist
from archiver.documents.sessions import SessionIndex, SessionLimits, lists_live
from archiver.errors import InputError, StoreError
from archiver.layout import RecordingId, SpoolFolders, StreamId, local_name, safe_id
from archiver.recordings.notices import ReadyNotice
from archiver.settings import Settings
from archiver.store.documents import write_merging

if TYPE_CHECKING:
    from archiver.recordings.notices import ReadyNotices
    from archiver.store.spool import Spool

log = structlog.get_logger(__name__)


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
    playlists: dict[str, str] = field(default_factory=dict)
    """The participants' multivariant playlists as last written, by key."""


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
        await self._write_participant_playlists(recording, session)
        return True

    async def _write_participant_playlists(self, recording: RecordingId, session: _Session) -> None:
        """Each participant's multivariant playlist, once their webcam or audio is listed and
        again when that changes (a few writes per participant, not one per segment)."""
        by_participant: dict[str, list[dict[str, Any]]] = {}
        for stream in session.index.streams.values():
            by_participant.setdefault(str(stream["participant_id"]), []).append(stream)
        for participant_id, streams in by_participant.items():
            try:
                participant = safe_id("participant_id", participant_id)
            except InputError:
                continue
            key = recording.participant_playlist_key(participant)
            text = render_participant_playlist(recording.participant_folder(participant), streams)
            if text is None or session.playlists.get(key) == text:
                continue
            try:
                await self.store.put(key, text.encode(), PLAYLIST_TYPE)
            except StoreError as exc:
                log.error("participant_playlist_write_failed", key=key, error=str(exc))
                continue
            session.playlists[key] = text

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
