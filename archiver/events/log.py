"""The meeting's other events, archived as received beside the video.

Every non-media event of a recording (participant events, transcripts, anything the
provider adds later) is appended to the recording's open batch on the receive loop, where
serialising one event is cheap; everything that touches the store runs in the log's own
task. Batches are JSON Lines, one event per line. A batch closes at a count or a size,
before an event that is too far (in relative time) from its first, once it has been open
that long on the wall clock, and when the last connection carrying the recording ends.
`events/manifest.json` lists the batches in order, each once the store has confirmed it.

Memory is bounded by construction: the open batch by its size, closed batches waiting for
the spool by a budget per recording and one for the process (a connection that sends past
them is not read until the spool has taken its batches), and a log leaves memory once its
final manifest is stored; a later event continues from the stored manifest.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from archiver.documents.manifests import (
    EventBatchEntry,
    EventsManifest,
    WriteBudget,
    dumps,
)
from archiver.documents.merging import events_header
from archiver.errors import StoreError
from archiver.layout import RecordingId, SpoolFolders, key_micros
from archiver.publishing import InOrderPublisher, ManifestWriter
from archiver.recovery.spooling import JSONL_TYPE, Recovery
from archiver.settings import Settings
from archiver.store.base import sha256_digest
from archiver.store.journal import StreamJournal
from archiver.store.spool import Spool
from archiver.values import EventMessage

if TYPE_CHECKING:
    from archiver.recordings.sessions import SessionWriter

log = structlog.get_logger(__name__)

AUDIO_EVENTS = frozenset({"audio_mixed_raw.data"})
"""Audio that is counted, not archived: the mix of everyone (each participant's own audio
is archived as a stream of its own)."""

WRITER = secrets.token_hex(4)
"""This process, in the names of the events batches it writes."""
_JOURNAL_TIME = datetime.fromtimestamp(0, UTC)
"""Events keep their own timestamps inside the line; the journal's is not used."""
_JOIN = "participant_events.join"
_LEAVE = "participant_events.leave"


def _inner(body: dict[str, Any]) -> dict[str, Any]:
    data = body.get("data")
    inner = data.get("data") if isinstance(data, dict) else None
    return inner if isinstance(inner, dict) else {}


def event_time(body: dict[str, Any]) -> float | None:
    """The relative timestamp (seconds) an event carries, if any: participant events carry
    one, a transcript's first word carries one."""
    inner = _inner(body)
    stamp = inner.get("timestamp")
    if not isinstance(stamp, dict):
        words = inner.get("words")
        first = words[0] if isinstance(words, list) and words else None
        stamp = first.get("start_timestamp") if isinstance(first, dict) else None
    relative = stamp.get("relative") if isinstance(stamp, dict) else None
    if isinstance(relative, int | float) and not isinstance(relative, bool):
        return float(relative) if math.isfinite(relative) else None
    return None


@dataclass(slots=True)
class _OpenBatch:
    journal_name: str = ""
    lines: list[bytes] = field(default_factory=list)
    first_relative: float | None = None
    last_relative: float | None = None
    event_types: Counter[str] = field(default_factory=Counter)
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class _ClosedBatch:
    journal_name: str
    body: bytes
    count: int
    first_relative: float | None
    last_relative: float | None
    event_types: dict[str, int]


class QueueBudget:
    """Bytes of closed events batches not yet in the spool, per recording and in all; the
    receive loop waits here rather than letting them grow."""

    def __init__(self, per_recording: int, total: int) -> None:
        self.per_recording = per_recording
        self.total_limit = total
        self.total = 0
        self.room = asyncio.Condition()

    def over(self, event_log: EventLog) -> bool:
        """Whether the connections sending this log's events must wait: its own batches are
        over its budget, or everyone's are over the process's and it has some waiting."""
        queued = event_log.queued_bytes
        return queued > self.per_recording or (self.total > self.total_limit and queued > 0)

    def add(self, event_log: EventLog, size: int) -> None:
        event_log.queued_bytes += size
        self.total += size

    async def remove(self, event_log: EventLog, size: int) -> None:
        event_log.queued_bytes -= size
        self.total -= size
        async with self.room:
            self.room.notify_all()

    async def wait(self, event_log: EventLog) -> None:
        async with self.room:
            await self.room.wait_for(lambda: not self.over(event_log))


class EventLog:
    """One recording's events: appended on the receive loop, written out by its own task,
    which alone touches the manifest."""

    def __init__(
        self,
        recording: RecordingId,
        settings: Settings,
        spool: Spool,
        sessions: SessionWriter,
        recovery: Recovery | None = None,
        budget: QueueBudget | None = None,
        on_done: Callable[[EventLog], None] | None = None,
    ) -> None:
        self.recording = recording
        self.settings = settings
        self.spool = spool
        self.sessions = sessions
        self.recovery = recovery
        self.queue_budget = budget or QueueBudget(
            settings.events_queued_bytes_per_recording, settings.events_queued_bytes
        )
        self.on_done = on_done
        """Told when the writer task has finished and nothing is left to write."""
        self.queued_bytes = 0
        """Closed batches not yet in the spool."""
        self.ending = False
        """Asked to complete: live manifest writes would be overwritten at once."""
        self.log = log.bind(bot=recording.bot_id, recording=recording.recording_id)
        self.users = 0
        self.open = _OpenBatch()
        self.latest_relative: float | None = None
        self.refs: dict[str, dict[str, Any]] = {}
        self.queue: asyncio.Queue[_ClosedBatch | None] = asyncio.Queue()
        """Closed batches for the writer task; None asks it to complete the manifest."""
        self.timer: asyncio.TimerHandle | None = None
        self.manifest: EventsManifest | None = None
        self.next_seq = 0
        self.budget = WriteBudget(settings.manifest_overhead_ratio)
        self.manifest_writer = ManifestWriter(spool, recording.events_manifest_key, self.budget)
        self.counters = {
            "events": 0,
            "batches": 0,
            "audio_buffers_skipped": 0,
            "upload_failures": 0,
            "manifest_failures": 0,
        }
        self.unwritten = False
        self.task: asyncio.Task[None] | None = None
        self.publisher: InOrderPublisher[EventBatchEntry] | None = None
        self.journal: StreamJournal | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    @property
    def idle(self) -> bool:
        """Nothing open, queued or being written, and no connection carrying it."""
        return not self.users and not self.open.lines and not self.running

    @property
    def quiet(self) -> bool:
        """No open batch and no closed one waiting for the spool: a connection may let go
        of it without keeping anything in memory (what is uploading still gets listed)."""
        return not self.open.lines and not self.queued_bytes

    def append(self, message: EventMessage) -> None:
        """Add one event to the open batch; closes the batch when a rule says so."""
        relative = event_time(message.body)
        batch = self.open
        if (
            relative is not None
            and batch.first_relative is not None
            and relative - batch.first_relative >= self.settings.events_batch_s
        ):
            self.close_batch()
            batch = self.open
        self.ending = False
        if not batch.lines:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.settings.events_batch_s, self.close_batch)
            batch.journal_name = f"{time.time_ns():020d}"
            self._journal().begin(batch.journal_name, None)
        # As received; re-serialised only when the sender spread it over several lines.
        line = message.raw if b"\n" not in message.raw else orjson.dumps(message.body)
        batch.lines.append(line)
        batch.bytes += len(line) + 1
        # Journaled at once (a write to the page cache, no fsync on the receive loop): a
        # crash of the process loses no event, a crash of the machine may.
        self._journal().record(math.nan if relative is None else relative, _JOURNAL_TIME, line)
        batch.event_types[message.event] += 1
        if relative is not None:
            if batch.first_relative is None:
                batch.first_relative = relative
            batch.last_relative = relative
            self.latest_relative = relative
        self.counters["events"] += 1
        self.unwritten = True
        self._note(message)
        if (
            len(batch.lines) >= self.settings.events_batch_count
            or batch.bytes >= self.settings.events_batch_bytes
        ):
            self.close_batch()

    def _journal(self) -> StreamJournal:
        if self.journal is None:
            folder = SpoolFolders(Path(self.settings.spool_dir)).journal(
                self.recording.journal_name
            )
            self.journal = StreamJournal(folder, events_header(self.recording))
        return self.journal

    def skip_audio(self) -> None:
        """Count an audio buffer: not archived, but visible in the manifest."""
        self.counters["audio_buffers_skipped"] += 1
        self.unwritten = True
        self.ending = False

    def _note(self, message: EventMessage) -> None:
        """Keep the ids' metadata, and tell the session index who joined or left when."""
        data = message.body.get("data")
        if not self.refs and isinstance(data, dict):
            self.refs = {
                name: data[name]
                for name in ("bot", "recording")
                if isinstance(data.get(name), dict)
            }
        if message.event in (_JOIN, _LEAVE) and message.participant_id is not None:
            inner = _inner(message.body)
            participant = inner.get("participant")
            self.sessions.record_presence(
                self.recording,
                message.participant_id,
                participant if isinstance(participant, dict) else {},
                message.event == _JOIN,
                inner.get("timestamp"),
            )

    def close_batch(self) -> None:
        """Hand the open batch to the writer task (nothing here waits for the store)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.open = self.open, _OpenBatch()
        if not batch.lines:
            return
        body = b"\n".join(batch.lines) + b"\n"
        count = len(batch.lines)
        batch.lines.clear()
        self.queue_budget.add(self, len(body))
        self.queue.put_nowait(
            _ClosedBatch(
                journal_name=batch.journal_name,
                body=body,
                count=count,
                first_relative=batch.first_relative,
                last_relative=batch.last_relative,
                event_types=dict(batch.event_types),
            )
        )
        self._ensure_running()

    def end(self) -> None:
        """Close the open batch and write the manifest as complete, if anything changed."""
        self.close_batch()
        if self.unwritten:
            self.ending = True
            self.queue.put_nowait(None)
            self._ensure_running()

    def tasks(self) -> list[asyncio.Task[Any]]:
        """Its writer's task and what that task waits for."""
        found = [] if self.task is None else [self.task]
        if self.publisher is not None:
            found.extend(self.publisher.tasks())
        return found

    def stop(self) -> None:
        """A shutdown past its deadline: the batch timer starts no more writes."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _ensure_running(self) -> None:
        if not self.running:
            self.task = asyncio.create_task(self._run(), name=f"events {self.recording.prefix}")
            self.task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.error("events_writer_failed", error=repr(exc), exc_info=exc)
        if self.idle and not self.unwritten and self.on_done is not None:
            self.on_done(self)

    async def _run(self) -> None:
        if self.manifest is None:
            if self.recovery is not None:
                await self.recovery.wait_for(self.recording.events_manifest_key)
            self.manifest = EventsManifest(self.recording, await self._load_previous())
            self.next_seq = self.manifest.next_seq
        self.manifest.status = "live"
        publish: InOrderPublisher[EventBatchEntry] = InOrderPublisher(
            self.spool, self.budget, self._list, self._lost_upload
        )
        self.publisher = publish
        try:
            while (batch := await self.queue.get()) is not None:
                await self._hand_over(batch, publish)
        finally:
            await publish.close()
            self.publisher = None  # it refers back to this log: let go, both are freed now
            self.manifest.status = "complete"
            # Events that came while this run was ending are the next run's to complete:
            # a connection ending then must still find them unwritten.
            self.unwritten = bool(self.open.lines) or not self.queue.empty()
            await self._write_manifest()
            if self.journal is not None and not self.open.lines:
                self.journal.close(remove=True)
                self.journal = None
        if not self.queue.empty():
            # Batches closed while this run was ending continue the log.
            self._ensure_running()

    async def _load_previous(self) -> dict[str, Any] | None:
        """The manifest an earlier connection or process wrote, continued rather than
        replaced."""
        try:
            previous = await self.manifest_writer.load()
        except StoreError as exc:
            self.log.warning("previous_events_manifest_unreadable", error=str(exc))
            return None
        if previous is not None and self.latest_relative is None:
            self.latest_relative = _last_relative(previous)
        return previous

    async def _hand_over(
        self,
        batch: _ClosedBatch,
        publish: InOrderPublisher[EventBatchEntry],
    ) -> None:
        """Spool one batch under its own key and queue its upload for in-order publishing."""
        seq = self.next_seq
        anchor = batch.first_relative
        if anchor is None:
            anchor = self.latest_relative if self.latest_relative is not None else 0.0
        key = self.recording.events_batch_key(key_micros(anchor), seq, WRITER)
        entry = EventBatchEntry(
            key=self.spool.location(key),
            seq=seq,
            count=batch.count,
            first_relative=batch.first_relative,
            last_relative=batch.last_relative,
            bytes=len(batch.body),
            sha256=sha256_digest(batch.body)[0],
            event_types=batch.event_types,
        )
        extra = {
            "manifest_key": self.recording.events_manifest_key,
            "entry": asdict(entry),
            **events_header(self.recording),
        }
        try:
            spooled = await self.spool.write(key, batch.body, JSONL_TYPE, extra, write_once=True)
        except StoreError as exc:
            self.counters["upload_failures"] += 1
            self.log.error("events_spool_failed", seq=seq, error=str(exc))
            return
        finally:
            # On disk (or lost, counted): it no longer weighs on memory.
            await self.queue_budget.remove(self, len(batch.body))
        if self.journal is not None:
            self.journal.discard(batch.journal_name)
        self.next_seq += 1
        publish.hand_over(entry, [spooled], batch.count)

    async def _list(self, entry: EventBatchEntry, events: int) -> None:
        """A batch the store confirmed, in order: into the manifest."""
        if self.manifest is None:
            return
        self.manifest.add(entry)
        self.counters["batches"] += 1
        # A log that is ending writes its complete manifest next: no live one first.
        if not self.ending and self.manifest_writer.due(self.manifest):
            await self._write_manifest()

    def _lost_upload(self, events: int, error: BaseException) -> None:
        self.counters["upload_failures"] += 1
        self.counters["events_lost"] = self.counters.get("events_lost", 0) + events
        self.log.error("events_upload_failed", events=events, error=repr(error))

    async def _write_manifest(self) -> None:
        manifest = self.manifest
        assert manifest is not None
        if self.refs:
            manifest.bot = self.refs.get("bot", manifest.bot)
            manifest.recording_ref = self.refs.get("recording", manifest.recording_ref)
        try:
            await self.manifest_writer.write(
                manifest,
                lambda: asyncio.to_thread(dumps, manifest.document(dict(self.counters))),
                lambda theirs: manifest.merge(
                    [EventBatchEntry(**batch) for batch in theirs.get("batches", [])]
                ),
            )
        except StoreError as exc:
            self.counters["manifest_failures"] += 1
            self.log.error("events_manifest_write_failed", error=str(exc))
            return
        # session.json names the events manifest only once it is stored, and says as much.
        self.sessions.record_events(self.recording, manifest, manifest.status)


def _last_relative(previous: dict[str, Any]) -> float | None:
    known = [
        b["last_relative"]
        for b in previous.get("batches", [])
        if b.get("last_relative") is not None
    ]
    return float(known[-1]) if known else None
