"""Demultiplexed streams: one worker per (bot, recording, participant, type, format).

The receive loop only enqueues. Each stream's worker takes its messages in order, hands
them in batches to a thread (`archiver.streams.batch`: base64, muxing and tar building stay
off the event loop),
uploads finished segments or batches in parallel, and publishes them to its manifest strictly
in order, only after the store confirmed them. What differs between H.264 and PNG is the
segmenter, the manifest, and how a finished object is spooled; the worker is shared."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal

import structlog

from archiver import metrics
from archiver.documents.manifests import (
    ArchiveManifest,
    EntryT,
    WriteBudget,
)
from archiver.documents.manifests import dumps as dump_json
from archiver.documents.merging import stream_header
from archiver.errors import InputError, StoreError
from archiver.layout import SpoolFolders, StreamId
from archiver.publishing import InOrderPublisher, ManifestWriter
from archiver.recordings.sessions import SessionWriter
from archiver.recovery.spooling import Recovery
from archiver.segmenting.base import FinishedT, Segmenter
from archiver.segmenting.timestamps import TimestampGuard
from archiver.settings import Settings
from archiver.store.documents import write_playlist
from archiver.store.journal import StreamJournal
from archiver.store.spool import Spool, SpooledObject
from archiver.streams.batch import BatchResult, describe_error, flush, segment
from archiver.streams.queue import QueuedBytes
from archiver.values import MediaMessage

log = structlog.get_logger(__name__)

EndReason = Literal["connection_closed", "participant_left", "idle", "shutdown"]


class Phase(enum.Enum):
    """Where a stream's worker is; what it was asked to end for is `Stream.ending`."""

    IDLE = "idle"
    """No run yet, or the last one ended without its final manifest stored."""
    OPENING = "opening"
    """Waiting for recovery or the store before the first frame: frames wait, not a stall."""
    TAKING = "taking"
    """Taking frames from the queue and segmenting them."""
    FINISHING = "finishing"
    """Flushing and writing the final manifest; frames queued now start the next run."""
    ENDED = "ended"
    """The last run's final manifest is stored: the registry may let the stream go."""


_UNDER_WAY = (Phase.OPENING, Phase.TAKING)
"""A run in these phases takes an end for itself; in any other, for the run after it."""
BATCH_MAX = 64
_OUR_FAILURES = frozenset({"segmenter_error", "worker_error"})


class Stream(ABC, Generic[FinishedT, EntryT]):
    """One stream's worker. Its segmenter lives on one thread at a time, its manifest on
    the event loop; nothing else touches either. Subclasses say how to start the manifest
    and segmenter of their format and how to spool what it finishes.

    What happens when something fails, so that the code can be held to it:
    - a frame that cannot be archived (bad base64, not H.264, an outlier timestamp) is
      dropped and counted by reason; the stream goes on;
    - a failure of the segmenter itself drops that frame, publishes what the open segment
      held, starts afresh at the next key frame, and puts the gap in the manifest;
    - a failure anywhere else in a run (a bug of ours) is logged with its traceback and
      counted (`worker_failures`); the frames in hand are counted as dropped, and whatever
      is queued starts the next run: the worker never ends with frames behind it;
    - a worker that takes nothing from its full queue for `stream_stall_s` sheds new frames
      (`dropped_backlog`) instead of stalling the connection's other streams, except while
      the spool is full or the stream is still opening (recovery, a slow store): that wait
      is the backpressure.
    """

    published_counter: ClassVar[str]
    """The manifest counter of stored objects ("segments", "batches")."""
    has_playlist: ClassVar[bool] = False
    """Whether an HLS playlist follows the manifest (fMP4 formats)."""

    def __init__(
        self,
        stream_id: StreamId,
        settings: Settings,
        spool: Spool,
        executor: Executor,
        sessions: SessionWriter,
        recovery: Recovery,
    ) -> None:
        self.id = stream_id
        self.settings = settings
        self.spool = spool
        self.executor = executor
        self.sessions = sessions
        self.recovery = recovery
        self.journal: StreamJournal | None = None
        self.header: dict[str, Any] = {}
        self.log = log.bind(
            bot=stream_id.recording.bot_id,
            recording=stream_id.recording.recording_id,
            participant=stream_id.participant_id,
            stream=f"{stream_id.source}/{stream_id.media_format}",
        )
        self.queue: deque[tuple[MediaMessage, QueuedBytes]] = deque()
        """Each frame with the budget (its connection's) that it counts against."""
        self.queued_bytes = 0
        self.wake = asyncio.Event()
        """Set when a frame is queued or the stream is asked to end."""
        self.hurry = asyncio.Event()
        """Set when waiting for frames to gather would hold up a sender or the end."""
        self.phase = Phase.IDLE
        self.ending: EndReason | None = None
        """Why the current run was asked to end, if it was."""
        self.next_ending: EndReason | None = None
        """An end asked for while the run was finishing: the next run's."""
        self.users = 0
        """Connections feeding this stream; the last one to close ends it."""
        self.last_progress = time.monotonic()
        self.taken_at = self.last_progress
        """When the latest batch was taken from the queue: what closes a segment arrived."""
        self.segmenter: Segmenter[FinishedT] | None = None
        self.manifest: ArchiveManifest[EntryT] | None = None
        self.guard: TimestampGuard[bytes] = TimestampGuard(
            settings.timestamp_tolerance_s, settings.timestamp_max_relative_s
        )
        self.budget = WriteBudget(settings.manifest_overhead_ratio)
        self.manifest_writer = ManifestWriter(spool, stream_id.manifest_key, self.budget)
        self.received = 0
        self.in_hand_frames = 0
        """Taken from the queue, on a thread being segmented."""
        self.held_frames = 0
        """In the segmenter's open segment or batch, or first frames the guard holds."""
        self.in_flight_frames = 0
        """In finished segments or batches, not yet listed."""
        self.counters = {
            self.published_counter: 0,
            "dropped_backlog": 0,
            "dropped_unstored": 0,
            "dropped_worker_error": 0,
            "worker_failures": 0,
            "continued_after_leave": 0,
            "continuations": 0,
            "upload_failures": 0,
            "manifest_failures": 0,
        }
        self.segmenter_counters: dict[str, int] = {}
        self.logged_rejects: dict[str, int] = {}
        self.journal_failures_logged = 0
        self.journal_accounted = 0
        """Journal bytes this stream has counted in the spool's state."""
        self.task: asyncio.Task[None] | None = None
        """The last run's final manifest is stored: nothing of this stream is only here."""
        self.on_ended: Callable[[Stream[Any, Any]], None] | None = None
        """Called when the worker has finished with nothing queued."""
        self.publisher: InOrderPublisher[EntryT] | None = None
        """The current run's (or the last one's)."""

    @property
    def journal_folder(self) -> Path:
        """This stream's journal, and the files of its open segments."""
        return SpoolFolders(Path(self.settings.spool_dir)).journal(self.id.journal_name)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    @property
    def open(self) -> bool:
        """Running and not asked to end: what counts against a connection's stream limit."""
        return self.running and self.ending is None and self.phase in _UNDER_WAY

    def start(self) -> None:
        self.last_progress = time.monotonic()
        self.phase = Phase.TAKING  # counts as open from now on, before its task first runs
        self.task = asyncio.create_task(self._supervise(), name=f"stream {self.id}")
        metrics.stream_running(self.id.media_format, self.task)

    async def feed(self, message: MediaMessage, budget: QueuedBytes) -> None:
        """Enqueue. While the queue is full (in messages or bytes: this stream's, or the
        `budget` of its connection and process) this waits, so the socket stops being read;
        unless the wait is not the spool's backpressure and lasts `stream_stall_s`: then the
        frame is shed, counted."""
        self.received += 1
        size = len(message.buffer_b64)
        stall_s = self.settings.stream_stall_s
        waiting_since = time.monotonic()
        while not self._room_for(size, budget):
            self.hurry.set()
            now = time.monotonic()
            legitimate_wait = self.spool.backpressure or self.phase is Phase.OPENING
            stalled = bool(self.queue) and now - self.last_progress >= stall_s
            if not legitimate_wait and (stalled or now - waiting_since >= stall_s):
                self.counters["dropped_backlog"] += 1
                self._log_reject(
                    InputError(
                        "backlog",
                        f"no room for {size} bytes for {now - waiting_since:.1f} s; the "
                        f"stream's worker last took a frame {now - self.last_progress:.1f} s ago",
                    )
                )
                return
            freed = budget.freed
            freed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05 + max(0.0, stall_s - (now - waiting_since))):
                    await freed.wait()
        if not self.queue:
            self.last_progress = time.monotonic()  # an idle worker is not a stalled one
        self.queue.append((message, budget))
        self.queued_bytes += size
        budget.add(size)
        self.wake.set()
        if len(self.queue) >= BATCH_MAX:
            self.hurry.set()

    def _room_for(self, size: int, budget: QueuedBytes) -> bool:
        """One message always fits an empty queue, if its budget has room; more while this
        stream's own limits allow too."""
        if not self.queue:
            return budget.fits(size)
        return (
            len(self.queue) < self.settings.stream_queue_messages
            and self.queued_bytes + size <= self.settings.stream_queue_bytes
            and budget.fits(size)
        )

    def end(self, reason: EndReason) -> None:
        """Ask the worker to finish once it has processed everything queued so far. Asked
        while a run is already finishing, it ends the run that frames queued meanwhile
        start; frames that arrive after the end start a new run of their own."""
        if not self.running:
            return
        if self.phase not in _UNDER_WAY:
            self.next_ending = self.next_ending or reason
        elif self.ending is None or reason == "shutdown":
            self.ending = reason
            self.wake.set()
            self.hurry.set()

    def tasks(self) -> list[asyncio.Task[Any]]:
        """Its worker's task and what that task waits for, while any is running."""
        found = [] if self.task is None else [self.task]
        if self.publisher is not None:
            found.extend(self.publisher.tasks())
        return found

    def pending_frames(self) -> int:
        return len(self.queue) + self.in_hand_frames + self.held_frames + self.in_flight_frames

    async def _supervise(self) -> None:
        """Run until the stream has ended with nothing queued. A failed run is logged and
        counted; what is queued behind it starts the next one (each run takes at least one
        frame, so this cannot loop without progress)."""
        while True:
            try:
                await self._run()
            except Exception:
                self.counters["worker_failures"] += 1
                self._count_lost_in_hand()
                self.log.exception("stream_worker_failed", queued=len(self.queue))
            if not self.queue:
                if self.on_ended is not None:
                    self.on_ended(self)
                return
            self.log.info("stream_continues", queued=len(self.queue))

    def _count_lost_in_hand(self) -> None:
        self.counters["dropped_worker_error"] += self.in_hand_frames
        self.in_hand_frames = 0

    async def _run(self) -> None:
        self.phase = Phase.TAKING
        if self.next_ending is not None:
            self.ending, self.next_ending = self.next_ending, None
        pending = self._take_queued()
        if not pending:
            return
        publish: InOrderPublisher[EntryT] = InOrderPublisher(
            self.spool, self.budget, self._list, self._lost_upload
        )
        self.publisher = publish
        reason: EndReason = "shutdown"
        try:
            await self._open(pending[0])
            while True:
                await self._segment(pending, publish)
                await self._let_frames_gather()
                pending = self._take_queued()
                if pending:
                    continue
                leaving = self.ending == "participant_left"
                if self.ending is not None and not leaving:
                    reason = self.ending
                    break
                # A leave waits out a grace period: frames of the same participant within it
                # continue this run instead of closing the stream and reopening it.
                wait_s = self.settings.leave_grace_s if leaving else self.settings.idle_timeout_s
                self.wake.clear()
                try:
                    async with asyncio.timeout(wait_s):
                        await self.wake.wait()
                except TimeoutError:
                    reason = "participant_left" if leaving else "idle"
                    break
                await self._let_frames_gather()
                pending = self._take_queued()
                if pending and leaving and self.ending == "participant_left":
                    self.ending = None
                    self.counters["continued_after_leave"] += 1
            self.phase = Phase.FINISHING
            await self._flush(publish)
        except Exception:
            self._count_lost_in_hand()
            raise
        finally:
            self.phase = Phase.FINISHING
            self.ending = None
            await publish.close()
            self.publisher = None  # it refers back to this stream: let go, both are freed now
            if self.manifest is not None:
                await self._finish(reason)
            if self.phase is Phase.FINISHING:
                self.phase = Phase.IDLE  # no final manifest stored: the stream is kept

    async def _let_frames_gather(self) -> None:
        """Wait until `batch_window_s` after the last batch was taken (fewer wake-ups, thread
        hops and journal writes per frame), unless a batch is already queued, a sender waits
        for room, or the stream is asked to end."""
        due = self.taken_at + self.settings.batch_window_s - time.monotonic()
        if due <= 0 or self.hurry.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(due):
                await self.hurry.wait()

    def _take_queued(self) -> list[MediaMessage]:
        """Take what is already queued, up to a batch."""
        taken: list[MediaMessage] = []
        while self.queue and len(taken) < BATCH_MAX:
            message, budget = self.queue.popleft()
            size = len(message.buffer_b64)
            self.queued_bytes -= size
            budget.free(size)
            taken.append(message)
        if taken:
            self.last_progress = self.taken_at = time.monotonic()
        if len(self.queue) < BATCH_MAX and self.ending is None:
            self.hurry.clear()
        self.in_hand_frames = len(taken)
        return taken

    async def _open(self, first: MediaMessage) -> None:
        """Start or resume the stream: a manifest already in the store is continued. While
        it waits for recovery or for the store to answer, its frames wait (backpressure),
        they are not shed: the worker is not stalled, the store is slow."""
        self.phase = Phase.OPENING
        try:
            await self._load_or_resume(first)
        finally:
            self.phase = Phase.TAKING
            self.last_progress = time.monotonic()
        assert self.manifest is not None
        assert self.segmenter is not None
        self.manifest.status = "live"
        self.header = stream_header(self.id, first.context, first.participant)
        try:
            self.journal = await asyncio.to_thread(
                StreamJournal, self.journal_folder, self.header, True
            )
        except OSError as exc:
            # Frames are still archived, only not safe from a crash of this process.
            self.journal = None
            self.log.error("journal_unavailable", error=str(exc))
        self.segmenter.journal = self.journal
        self.sessions.record(self.id, self.manifest, "live")
        self.log.info("stream_started", relative=first.relative_s)

    async def _load_or_resume(self, first: MediaMessage) -> None:
        try:
            await self.recovery.wait_for(self.id.manifest_key)
        except Exception:
            self.log.exception("recovery_failed_before_resume")
        if self.manifest is not None and self.segmenter is not None:
            return
        previous = await self._load_previous()
        try:
            self.manifest, self.segmenter = self._begin(first, previous)
        except Exception:
            # A stored manifest this version cannot continue: start afresh beside it (its
            # objects stay in the store; the next write merges what it lists).
            self.log.exception("previous_manifest_unusable")
            self.manifest, self.segmenter = self._begin(first, None)
        try:
            await self._carry_on(previous)
        except Exception:
            self.log.exception("stream_not_continued")
        if previous is not None:
            self.log.info("stream_resumed", **{self.published_counter: len(self.manifest.entries)})
        self._seed_guard(self.manifest)

    def _seed_guard(self, manifest: ArchiveManifest[EntryT]) -> None:
        """The recording's start is known from what is already archived."""
        if not manifest.entries:
            return
        last = manifest.entries[-1]
        with contextlib.suppress(ValueError, OverflowError):
            wallclock = datetime.fromisoformat(last.start_wallclock)
            if wallclock.tzinfo is None:
                wallclock = wallclock.replace(tzinfo=UTC)
            self.guard.seed(wallclock.timestamp() - last.start, last.end)

    async def _load_previous(self) -> dict[str, Any] | None:
        """The stored manifest, and its version, which this stream's writes then replace."""
        try:
            return await self.manifest_writer.load()
        except StoreError as exc:
            self.log.warning("previous_manifest_unreadable", error=str(exc))
            return None

    async def _segment(self, batch: list[MediaMessage], publish: InOrderPublisher[EntryT]) -> None:
        assert self.manifest is not None
        for message in batch:
            self.manifest.update_participant(message.relative_s, message.participant)
        await self.spool.wait_for_room_to_journal()
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.executor, self._segment_batch, batch)
        self._take_result(result)
        for finished in result.finished:
            await self._hand_over(finished, publish)

    def _take_result(self, result: BatchResult[FinishedT]) -> None:
        """Account for a batch the thread is done with, before anything can wait."""
        assert self.manifest is not None
        self._account_journal()
        self.in_hand_frames = 0
        self.held_frames = result.held_frames
        self.in_flight_frames += sum(finished.frame_count for finished in result.finished)
        self.segmenter_counters = result.counters
        metrics.stream_counters(self, self.id.media_format, result.counters, self.counters)
        self.manifest.gaps.extend(result.gaps)
        for error in result.rejected:
            self._log_reject(error)
        journal = self.journal
        if journal is not None and journal.failures > self.journal_failures_logged:
            self.log.error(
                "journal_write_failed", failures=journal.failures, error=journal.last_error
            )
            self.journal_failures_logged = journal.failures

    def _account_journal(self) -> None:
        """Tell the spool how much of its disk this stream's journal holds now."""
        held = self.journal.held_bytes if self.journal is not None else 0
        self.spool.account_journal(held - self.journal_accounted)
        self.journal_accounted = held

    def _segment_batch(self, batch: list[MediaMessage]) -> BatchResult[FinishedT]:
        """Runs on a worker thread: see `batch.segment`."""
        assert self.segmenter is not None
        return segment(self.segmenter, self.guard, self.journal, batch)

    def _flush_segmenter(self) -> BatchResult[FinishedT]:
        """Runs on a worker thread: see `batch.flush`."""
        assert self.segmenter is not None
        return flush(self.segmenter, self.guard, self.journal)

    async def _flush(self, publish: InOrderPublisher[EntryT]) -> None:
        if self.segmenter is None:
            return
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.executor, self._flush_segmenter)
        self._take_result(result)
        for finished in result.finished:
            await self._hand_over(finished, publish)

    def _log_reject(self, error: InputError) -> None:
        """Log the first of each reason, then every hundredth: counted always, never a flood.
        Failures of ours are errors, with what raised."""
        seen = self.logged_rejects.get(error.reason, 0) + 1
        self.logged_rejects[error.reason] = seen
        if seen == 1 or seen % 100 == 0:
            level = self.log.error if error.reason in _OUR_FAILURES else self.log.warning
            level("frame_dropped", reason=error.reason, detail=error.detail, seen=seen)

    @abstractmethod
    def _begin(
        self, first: MediaMessage, previous: dict[str, Any] | None
    ) -> tuple[ArchiveManifest[EntryT], Segmenter[FinishedT]]:
        """The manifest (continuing `previous`) and the segmenter that carries on from it."""

    async def _carry_on(self, previous: dict[str, Any] | None) -> None:
        """Take over what a format's segmenter needs of the archive so far (`previous`: the
        stored manifest); by default, nothing (every PNG stands alone)."""

    @abstractmethod
    async def _spool(self, finished: FinishedT) -> tuple[EntryT, list[SpooledObject]]:
        """Put a finished object in the spool; return its entry and what is to be confirmed."""

    async def _hand_over(self, finished: FinishedT, publish: InOrderPublisher[EntryT]) -> None:
        """Spool a finished segment or batch (waiting for room when the spool is full: that
        wait is the backpressure), forget its journal, and queue its upload for in-order
        publishing."""
        try:
            entry, spooled = await self._spool(finished)
        except Exception as exc:  # noqa: BLE001 (this segment's frames only, counted)
            self.in_flight_frames -= finished.frame_count
            self.counters["dropped_unstored"] += finished.frame_count
            self.counters["upload_failures"] += 1
            self.log.error(
                "segment_spool_failed",
                seq=finished.seq,
                frames=finished.frame_count,
                error=describe_error(exc),
            )
            return
        if self.journal is not None:
            self.journal.discard(finished.name)
            self._account_journal()
        publish.hand_over(
            entry,
            spooled,
            finished.frame_count,
            partial(metrics.segment_durable, self.id.media_format, self.taken_at),
        )

    async def _list(self, entry: EntryT, frames: int) -> None:
        """A segment or batch the store confirmed, in order: into the manifest."""
        self.in_flight_frames -= frames
        if self.manifest is None:
            return
        self.manifest.add(entry)
        metrics.frames_archived(self.id.media_format, frames)
        self.counters[self.published_counter] += 1
        if self.manifest_writer.due(self.manifest):
            await self._write_manifest()

    def _lost_upload(self, frames: int, error: BaseException) -> None:
        self.in_flight_frames -= frames
        self.counters["dropped_unstored"] += frames
        self.counters["upload_failures"] += 1
        self.log.error("segment_upload_failed", frames=frames, error=describe_error(error))

    async def _manifest_body(self) -> bytes:
        """Built on the loop, which owns the manifest; serialised on a thread."""
        assert self.manifest is not None
        counters = {
            **self.segmenter_counters,
            **self.counters,
            "received": self.received,
            "pending": self.pending_frames(),
        }
        document = self.manifest.document(counters)
        return await asyncio.to_thread(dump_json, document)

    async def _write_manifest(self) -> bool:
        assert self.manifest is not None
        try:
            await self.manifest_writer.write(self.manifest, self._manifest_body, self._take_in)
        except StoreError as exc:
            self.counters["manifest_failures"] += 1
            self.log.error("manifest_write_failed", error=str(exc))
            return False
        except Exception:
            self.counters["manifest_failures"] += 1
            self.log.exception("manifest_write_failed")
            return False
        if self.has_playlist:
            await self._write_playlist()
        return True

    async def _write_playlist(self) -> None:
        """The HLS playlist follows every manifest write, on the manifest's budget; it names
        only what that manifest lists."""
        assert self.manifest is not None
        document = {"status": self.manifest.status, "segments": list(self.manifest.entry_documents)}
        try:
            size = await write_playlist(self.spool, self.id.playlist_key, document)
        except StoreError as exc:
            self.counters["manifest_failures"] += 1
            self.log.error("playlist_write_failed", error=str(exc))
            return
        self.budget.count_companion(size)

    def _take_in(self, theirs: dict[str, Any]) -> None:
        """Another machine wrote this stream's manifest too: list its objects as well."""
        assert self.manifest is not None
        documents = theirs.get(self.manifest.entries_name, [])
        added = self.manifest.merge([self.manifest.entry_from(d) for d in documents])
        self.manifest.take_gaps(theirs.get("gaps", []))
        self.log.warning("manifest_merged", added=added, listed=len(self.manifest.entries))

    async def _finish(self, reason: EndReason) -> None:
        assert self.manifest is not None
        unlisted = self.held_frames + self.in_flight_frames + self.in_hand_frames
        # Complete only when every frame received is listed or counted as dropped; frames
        # already queued again are the next run's, which continues this manifest.
        self.manifest.status = "complete" if not unlisted else "interrupted"
        if unlisted:
            self.log.error("stream_ended_with_unlisted_frames", frames=unlisted)
        if await self._write_manifest():
            self.phase = Phase.ENDED
        if self.journal is not None:
            await asyncio.to_thread(self.journal.close, True)
            self._account_journal()
            self.journal = None
        self.sessions.record(self.id, self.manifest, "complete")
        metrics.stream_counters(self, self.id.media_format, self.segmenter_counters, self.counters)
        self.log.info(
            "stream_ended",
            reason=reason,
            received=self.received,
            **self.segmenter_counters,
            **self.counters,
            manifest_writes=self.budget.manifest_requests,
        )
