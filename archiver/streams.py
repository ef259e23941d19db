"""Demultiplexed streams: one worker per (bot, recording, participant, type, format).

The receive loop only enqueues. Each stream's worker takes its messages in order, hands
them in batches to a thread (base64, muxing and tar building stay off the event loop),
uploads finished segments or batches in parallel, and publishes them to its manifest strictly
in order, only after the store confirmed them. What differs between H.264 and PNG is the
segmenter, the manifest, and how a finished object is spooled; the worker is shared.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from abc import ABC, abstractmethod
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal

import structlog

from archiver.errors import InputError, StoreError
from archiver.events import EventArchive
from archiver.ingest.messages import MediaMessage
from archiver.layout import MediaFormat, RecordingId, StreamId
from archiver.manifests import (
    ArchiveManifest,
    EntryT,
    EventsManifest,
    PngBatchEntry,
    PngManifest,
    SegmentEntry,
    SessionIndex,
    StreamManifest,
    StreamStatus,
    WriteBudget,
    parse_document,
    write_merging,
)
from archiver.manifests import dumps as dump_json
from archiver.recovery import (
    JOURNAL_FOLDER,
    Recovery,
    spool_batch,
    spool_segment,
    stream_header,
)
from archiver.segmenting.base import FinishedT, Segmenter
from archiver.segmenting.fmp4 import H264Segmenter, MediaSegment
from archiver.segmenting.png import PngBatch, PngBatcher
from archiver.settings import Settings
from archiver.store.journal import StreamJournal
from archiver.store.spool import Spool, SpooledObject

log = structlog.get_logger(__name__)

EndReason = Literal["connection_closed", "participant_left", "idle", "shutdown"]
_BATCH_MAX = 64


@dataclass(frozen=True, slots=True)
class _End:
    reason: EndReason


@dataclass(frozen=True, slots=True)
class _BatchResult(Generic[FinishedT]):
    finished: list[FinishedT]
    rejected: list[InputError]
    counters: dict[str, int]


class Stream(ABC, Generic[FinishedT, EntryT]):
    """One stream's worker. Its segmenter lives on one thread at a time, its manifest on
    the event loop; nothing else touches either. Subclasses say how to start the manifest
    and segmenter of their format and how to spool what it finishes."""

    published_counter: ClassVar[str]
    """The manifest counter of stored objects ("segments", "batches")."""

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
        self.manifest_etag = ""
        """The stored manifest version this stream writes over ("": none stored yet)."""
        self.header: dict[str, Any] = {}
        self.log = log.bind(
            bot=stream_id.recording.bot_id,
            recording=stream_id.recording.recording_id,
            participant=stream_id.participant_id,
            stream=f"{stream_id.video_type}/{stream_id.media_format}",
        )
        self.queue: asyncio.Queue[MediaMessage | _End] = asyncio.Queue(
            settings.stream_queue_messages
        )
        self.segmenter: Segmenter[FinishedT] | None = None
        self.manifest: ArchiveManifest[EntryT] | None = None
        self.budget = WriteBudget(settings.manifest_overhead_ratio)
        self.counters = {self.published_counter: 0, "upload_failures": 0, "manifest_failures": 0}
        self.segmenter_counters: dict[str, int] = {}
        self.logged_rejects: dict[str, int] = {}
        self.task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"stream {self.id}")

    async def feed(self, message: MediaMessage) -> None:
        """Enqueue; waits (so the socket stops being read) while the queue is full."""
        await self.queue.put(message)

    async def end(self, reason: EndReason) -> None:
        if self.running:
            await self.queue.put(_End(reason))

    async def _run(self) -> None:
        first = await self.queue.get()
        if isinstance(first, _End):
            return
        publish: asyncio.Queue[asyncio.Task[EntryT | None] | None] = asyncio.Queue()
        publisher = asyncio.create_task(self._publish_in_order(publish))
        reason: EndReason = "shutdown"
        try:
            await self._open(first)
            pending: list[MediaMessage] = [first]
            while True:
                ended = self._drain(pending)
                if pending:
                    await self._segment(pending, publish)
                    pending = []
                if ended is not None:
                    reason = ended.reason
                    break
                try:
                    async with asyncio.timeout(self.settings.idle_timeout_s):
                        item = await self.queue.get()
                except TimeoutError:
                    reason = "idle"
                    break
                if isinstance(item, _End):
                    reason = item.reason
                    break
                pending.append(item)
            await self._flush(publish)
        finally:
            await publish.put(None)
            await publisher
            if self.manifest is not None:
                await self._finish(reason)
        if not self.queue.empty():
            # Frames that arrived while this run was ending continue the stream.
            self.start()

    def _drain(self, pending: list[MediaMessage]) -> _End | None:
        """Take what is already queued, up to a batch; stop at an end marker."""
        while len(pending) < _BATCH_MAX:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
            if isinstance(item, _End):
                return item
            pending.append(item)
        return None

    async def _open(self, first: MediaMessage) -> None:
        """Start or resume the stream: a manifest already in the store is continued."""
        await self.recovery.wait_for(self.id.manifest_key)
        if self.manifest is None or self.segmenter is None:
            previous = await self._load_previous()
            self.manifest, self.segmenter = self._begin(first, previous)
            if previous is not None:
                self.log.info(
                    "stream_resumed", **{self.published_counter: len(self.manifest.entries)}
                )
        self.manifest.status = "live"
        self.header = stream_header(self.id, first.context, first.participant)
        folder = Path(self.settings.spool_dir) / JOURNAL_FOLDER / self.id.journal_name
        self.journal = await asyncio.to_thread(StreamJournal, folder, self.header)
        self.segmenter.journal = self.journal
        self.sessions.record(self.id, self.manifest, "live")
        self.log.info("stream_started", relative=first.relative_s)

    async def _load_previous(self) -> dict[str, Any] | None:
        """The stored manifest, and its version, which this stream's writes then replace."""
        try:
            fetched = await self.spool.fetch(self.id.manifest_key)
        except StoreError as exc:
            self.log.warning("previous_manifest_unreadable", error=str(exc))
            return None
        if fetched is None:
            return None
        body, self.manifest_etag = fetched
        return parse_document(body, self.id.manifest_key)

    async def _segment(
        self,
        batch: list[MediaMessage],
        publish: asyncio.Queue[asyncio.Task[EntryT | None] | None],
    ) -> None:
        assert self.manifest is not None
        for message in batch:
            self.manifest.update_participant(message.relative_s, message.participant)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.executor, self._segment_batch, batch)
        self.segmenter_counters = result.counters
        for error in result.rejected:
            self._log_reject(error)
        for finished in result.finished:
            await self._hand_over(finished, publish)

    def _segment_batch(self, batch: list[MediaMessage]) -> _BatchResult[FinishedT]:
        """Runs on a worker thread: base64 and segmenting for a batch of one stream."""
        segmenter = self.segmenter
        assert segmenter is not None
        finished: list[FinishedT] = []
        rejected: list[InputError] = []
        for message in batch:
            try:
                data = base64.b64decode(message.buffer_b64, validate=True)
            except (binascii.Error, ValueError) as exc:
                segmenter.reject("bad_base64")
                rejected.append(InputError("bad_base64", str(exc)))
                continue
            try:
                finished.extend(segmenter.push(data, message.relative_s, message.absolute))
            except InputError as exc:
                rejected.append(exc)
        if self.journal is not None:
            self.journal.sync_if_due()
        return _BatchResult(finished, rejected, segmenter.snapshot())

    async def _flush(self, publish: asyncio.Queue[asyncio.Task[EntryT | None] | None]) -> None:
        segmenter = self.segmenter
        if segmenter is None:
            return
        loop = asyncio.get_running_loop()
        closed = await loop.run_in_executor(self.executor, segmenter.flush)
        self.segmenter_counters = segmenter.snapshot()
        for finished in closed:
            await self._hand_over(finished, publish)

    def _log_reject(self, error: InputError) -> None:
        """Log the first of each reason, then every hundredth: counted always, never a flood."""
        seen = self.logged_rejects.get(error.reason, 0) + 1
        self.logged_rejects[error.reason] = seen
        if seen == 1 or seen % 100 == 0:
            self.log.warning("frame_dropped", reason=error.reason, detail=error.detail, seen=seen)

    @abstractmethod
    def _begin(
        self, first: MediaMessage, previous: dict[str, Any] | None
    ) -> tuple[ArchiveManifest[EntryT], Segmenter[FinishedT]]:
        """The manifest (continuing `previous`) and the segmenter that carries on from it."""

    @abstractmethod
    async def _spool(self, finished: FinishedT) -> tuple[EntryT, list[SpooledObject]]:
        """Put a finished object in the spool; return its entry and what is to be confirmed."""

    async def _hand_over(
        self,
        finished: FinishedT,
        publish: asyncio.Queue[asyncio.Task[EntryT | None] | None],
    ) -> None:
        """Spool a finished segment or batch (waiting for room when the spool is full: that
        wait is the backpressure), forget its journal, and queue its upload for in-order
        publishing."""
        try:
            entry, spooled = await self._spool(finished)
        except StoreError as exc:
            self.counters["upload_failures"] += 1
            self.log.error("segment_spool_failed", seq=finished.seq, error=str(exc))
            return
        if self.journal is not None:
            self.journal.discard(finished.name)
        await publish.put(asyncio.create_task(self._confirm(entry, spooled)))

    async def _confirm(self, entry: EntryT, spooled: list[SpooledObject]) -> EntryT:
        for spooled_object in spooled:
            await self.spool.confirm(spooled_object)
            self.budget.count_media(spooled_object.size)
        return entry

    async def _publish_in_order(
        self, publish: asyncio.Queue[asyncio.Task[EntryT | None] | None]
    ) -> None:
        while (upload := await publish.get()) is not None:
            entry = await upload
            if entry is None or self.manifest is None:
                continue
            self.manifest.add(entry)
            self.counters[self.published_counter] += 1
            if self.budget.allows(len(self.manifest.entries)):
                await self._write_manifest()

    def _manifest_body(self) -> bytes:
        assert self.manifest is not None
        return dump_json(self.manifest.document({**self.segmenter_counters, **self.counters}))

    async def _write_manifest(self) -> bool:
        assert self.manifest is not None
        try:
            stored, body = await write_merging(
                self.spool,
                self.id.manifest_key,
                self.manifest_etag,
                self._manifest_body,
                self._take_in,
            )
        except StoreError as exc:
            self.counters["manifest_failures"] += 1
            self.log.error("manifest_write_failed", error=str(exc))
            return False
        self.manifest_etag = stored.etag
        self.budget.count_manifest(len(body), len(self.manifest.entries))
        await self.spool.listed(self.id.manifest_key, self.manifest.listed_keys())
        return True

    def _take_in(self, theirs: dict[str, Any]) -> None:
        """Another machine wrote this stream's manifest too: list its objects as well."""
        assert self.manifest is not None
        documents = theirs.get(self.manifest.entries_name, [])
        added = self.manifest.merge([self.manifest.entry_from(d) for d in documents])
        self.log.warning("manifest_merged", added=added, listed=len(self.manifest.entries))

    async def _finish(self, reason: EndReason) -> None:
        assert self.manifest is not None
        self.manifest.status = "complete"
        await self._write_manifest()
        if self.journal is not None:
            await asyncio.to_thread(self.journal.close, True)
            self.journal = None
        self.sessions.record(self.id, self.manifest, "complete")
        self.log.info(
            "stream_ended",
            reason=reason,
            **self.segmenter_counters,
            **self.counters,
            manifest_writes=self.budget.manifest_requests,
        )


class H264Stream(Stream[MediaSegment, SegmentEntry]):
    """H.264 access units into fMP4 segments, each behind its init segment."""

    published_counter = "segments"
    spooled_inits: set[str]
    """Init segments this stream has spooled: each is stored once, not with every segment."""

    def _begin(
        self, first: MediaMessage, previous: dict[str, Any] | None
    ) -> tuple[StreamManifest, H264Segmenter]:
        manifest = StreamManifest(self.id, first.context, first.participant, previous)
        segmenter = H264Segmenter(
            self.settings.segment_target_s,
            first_seq=manifest.next_seq,
            last_ticks=manifest.last_ticks,
        )
        self.spooled_inits = set()
        return manifest, segmenter

    async def _spool(self, finished: MediaSegment) -> tuple[SegmentEntry, list[SpooledObject]]:
        init_key = self.id.init_key(finished.init_sha256)
        stored = await spool_segment(
            self.spool,
            self.id,
            finished,
            self.header,
            with_init=init_key not in self.spooled_inits,
        )
        self.spooled_inits.add(init_key)
        return stored


class PngStream(Stream[PngBatch, PngBatchEntry]):
    """PNG frames into tar batches."""

    published_counter = "batches"

    def _begin(
        self, first: MediaMessage, previous: dict[str, Any] | None
    ) -> tuple[PngManifest, PngBatcher]:
        manifest = PngManifest(self.id, first.context, first.participant, previous)
        batcher = PngBatcher(
            self.settings.png_batch_frames,
            self.settings.png_batch_s,
            first_seq=manifest.next_seq,
            last_micros=manifest.last_micros,
        )
        return manifest, batcher

    async def _spool(self, finished: PngBatch) -> tuple[PngBatchEntry, list[SpooledObject]]:
        return await spool_batch(self.spool, self.id, finished, self.header)


_STREAM_TYPES: dict[MediaFormat, type[Stream[Any, Any]]] = {
    "h264": H264Stream,
    "png": PngStream,
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


class StreamRegistry:
    """Every stream of this process, by id, and every recording's events; routes messages
    and ends streams."""

    def __init__(
        self, settings: Settings, spool: Spool, executor: Executor, recovery: Recovery
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.executor = executor
        self.recovery = recovery
        self.sessions = SessionWriter(spool)
        self.events = EventArchive(settings, spool, self.sessions, recovery)
        self.streams: dict[StreamId, Stream[Any, Any]] = {}

    async def dispatch(self, message: MediaMessage) -> None:
        stream = self.streams.get(message.stream)
        if stream is None:
            stream_type = _STREAM_TYPES[message.stream.media_format]
            stream = self.streams[message.stream] = stream_type(
                message.stream,
                self.settings,
                self.spool,
                self.executor,
                self.sessions,
                self.recovery,
            )
        if not stream.running:
            stream.start()
        await stream.feed(message)

    async def end(self, stream_ids: set[StreamId], reason: EndReason) -> None:
        for stream_id in stream_ids:
            stream = self.streams.get(stream_id)
            if stream is not None:
                await stream.end(reason)

    async def end_participant(self, recording: RecordingId, participant_id: str) -> None:
        ids = {
            s
            for s in self.streams
            if s.recording == recording and s.participant_id == participant_id
        }
        await self.end(ids, "participant_left")

    async def wait_idle(self) -> None:
        """Wait until every stream's worker and every events log has finished and every
        index is written."""
        while tasks := [s.task for s in self.streams.values() if s.running and s.task]:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.events.wait_idle()
        await self.sessions.flush()

    async def close(self) -> None:
        await self.end(set(self.streams), "shutdown")
        self.events.end_all()
        await self.wait_idle()

    def unfinished(self) -> list[str]:
        """Manifest keys of streams and events logs still being written out."""
        streams = [s.id.manifest_key for s in self.streams.values() if s.running]
        return sorted([*streams, *self.events.unfinished()])
