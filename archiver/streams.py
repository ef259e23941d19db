"""Demultiplexed streams: one worker per (bot, recording, participant, type, format).

The receive loop only enqueues. Each stream's worker takes its messages in order, hands
them in batches to a thread (base64 and muxing stay off the event loop), uploads finished
segments in parallel, and publishes them to its manifest strictly in order, only after the
store confirmed them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import structlog

from archiver.errors import InputError, StoreError
from archiver.ingest.messages import MediaMessage
from archiver.layout import RecordingId, StreamId
from archiver.manifests import (
    JSON_TYPE,
    SegmentEntry,
    SessionIndex,
    StreamManifest,
    StreamStatus,
    WriteBudget,
)
from archiver.manifests import dumps as dump_json
from archiver.recovery import JOURNAL_FOLDER, Recovery, spool_segment, stream_header
from archiver.segmenting.fmp4 import H264Segmenter, MediaSegment, segment_name
from archiver.settings import Settings
from archiver.store.journal import StreamJournal
from archiver.store.spool import Spool, SpooledObject

log = structlog.get_logger(__name__)

EndReason = Literal["connection_closed", "participant_left", "idle", "shutdown"]
_BATCH_MAX = 64
_PUBLISH_AHEAD = 4
MP4_TYPE = "video/mp4"
SEGMENT_TYPE = "video/iso.segment"


@dataclass(frozen=True, slots=True)
class _End:
    reason: EndReason


@dataclass(frozen=True, slots=True)
class _BatchResult:
    segments: list[MediaSegment]
    rejected: list[InputError]
    counters: dict[str, int]


class Stream:
    """One stream's worker. Its segmenter lives on one thread at a time, its manifest on
    the event loop; nothing else touches either."""

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
            stream=f"{stream_id.video_type}/{stream_id.media_format}",
        )
        self.queue: asyncio.Queue[MediaMessage | _End] = asyncio.Queue(
            settings.stream_queue_messages
        )
        self.segmenter: H264Segmenter | None = None
        self.manifest: StreamManifest | None = None
        self.budget = WriteBudget(settings.manifest_overhead_ratio)
        self.counters = {"segments": 0, "upload_failures": 0, "manifest_failures": 0}
        self.segmenter_counters: dict[str, int] = {}
        self.spooled_inits: set[str] = set()
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
        publish: asyncio.Queue[asyncio.Task[SegmentEntry | None] | None] = asyncio.Queue()
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
        if self.manifest is None:
            previous = await self._load_previous()
            self.manifest = StreamManifest(self.id, first.context, first.participant, previous)
            if previous is not None:
                self.log.info("stream_resumed", segments=len(self.manifest.segments))
        self.manifest.status = "live"
        self.header = stream_header(self.id, first.context, first.participant)
        folder = Path(self.settings.spool_dir) / JOURNAL_FOLDER / self.id.journal_name
        self.journal = await asyncio.to_thread(StreamJournal, folder, self.header)
        if self.segmenter is None:
            self.segmenter = H264Segmenter(
                self.settings.segment_target_s,
                first_seq=self.manifest.next_seq,
                last_ticks=self.manifest.last_ticks,
            )
        self.segmenter.journal = self.journal
        self.sessions.record(self.id, self.manifest, "live")
        self.log.info("stream_started", relative=first.relative_s)

    async def _load_previous(self) -> dict[str, Any] | None:
        try:
            raw = await self.spool.get(self.id.manifest_key)
        except StoreError as exc:
            self.log.warning("previous_manifest_unreadable", error=str(exc))
            return None
        if raw is None:
            return None
        try:
            previous: dict[str, Any] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.log.warning("previous_manifest_corrupt")
            return None
        return previous

    async def _segment(
        self,
        batch: list[MediaMessage],
        publish: asyncio.Queue[asyncio.Task[SegmentEntry | None] | None],
    ) -> None:
        assert self.manifest is not None
        for message in batch:
            self.manifest.update_participant(message.relative_s, message.participant)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.executor, self._segment_batch, batch)
        self.segmenter_counters = result.counters
        for error in result.rejected:
            self._log_reject(error)
        for segment in result.segments:
            await self._hand_over(segment, publish)

    def _segment_batch(self, batch: list[MediaMessage]) -> _BatchResult:
        """Runs on a worker thread: base64 and muxing for a batch of one stream."""
        segmenter = self.segmenter
        assert segmenter is not None
        segments: list[MediaSegment] = []
        rejected: list[InputError] = []
        for message in batch:
            try:
                data = base64.b64decode(message.buffer_b64, validate=True)
            except (binascii.Error, ValueError) as exc:
                segmenter.reject("bad_base64")
                rejected.append(InputError("bad_base64", str(exc)))
                continue
            try:
                segments.extend(segmenter.push(data, message.relative_s, message.absolute))
            except InputError as exc:
                rejected.append(exc)
        if self.journal is not None:
            self.journal.sync_if_due()
        return _BatchResult(segments, rejected, segmenter.counters.snapshot())

    async def _flush(
        self, publish: asyncio.Queue[asyncio.Task[SegmentEntry | None] | None]
    ) -> None:
        segmenter = self.segmenter
        if segmenter is None:
            return
        loop = asyncio.get_running_loop()
        segments = await loop.run_in_executor(self.executor, segmenter.flush)
        self.segmenter_counters = segmenter.counters.snapshot()
        for segment in segments:
            await self._hand_over(segment, publish)

    def _log_reject(self, error: InputError) -> None:
        """Log the first of each reason, then every hundredth: counted always, never a flood."""
        seen = self.logged_rejects.get(error.reason, 0) + 1
        self.logged_rejects[error.reason] = seen
        if seen == 1 or seen % 100 == 0:
            self.log.warning("frame_dropped", reason=error.reason, detail=error.detail, seen=seen)

    async def _hand_over(
        self,
        segment: MediaSegment,
        publish: asyncio.Queue[asyncio.Task[SegmentEntry | None] | None],
    ) -> None:
        """Spool a finished segment (waiting for room when the spool is full: that wait is
        the backpressure), forget its journal, and queue its upload for in-order publishing."""
        init_key = self.id.init_key(segment.init_sha256)
        with_init = init_key not in self.spooled_inits
        try:
            entry, spooled = await spool_segment(
                self.spool, self.id, segment, self.header, with_init=with_init
            )
        except StoreError as exc:
            self.counters["upload_failures"] += 1
            self.log.error("segment_spool_failed", seq=segment.seq, error=str(exc))
            return
        self.spooled_inits.add(init_key)
        if self.journal is not None:
            self.journal.discard(segment_name(segment.start_ticks))
        await publish.put(asyncio.create_task(self._confirm(entry, spooled)))

    async def _confirm(self, entry: SegmentEntry, spooled: list[SpooledObject]) -> SegmentEntry:
        for spooled_object in spooled:
            await self.spool.confirm(spooled_object)
            self.budget.count_media(spooled_object.size)
        return entry

    async def _publish_in_order(
        self, publish: asyncio.Queue[asyncio.Task[SegmentEntry | None] | None]
    ) -> None:
        while (upload := await publish.get()) is not None:
            entry = await upload
            if entry is None or self.manifest is None:
                continue
            self.manifest.add(entry)
            self.counters["segments"] += 1
            if self.budget.allows(len(self.manifest.segments)):
                await self._write_manifest(self._manifest_body())

    def _manifest_body(self) -> bytes:
        assert self.manifest is not None
        return dump_json(self.manifest.document({**self.segmenter_counters, **self.counters}))

    async def _write_manifest(self, body: bytes) -> bool:
        assert self.manifest is not None
        try:
            await self.spool.put(self.id.manifest_key, body, JSON_TYPE)
        except StoreError as exc:
            self.counters["manifest_failures"] += 1
            self.log.error("manifest_write_failed", error=str(exc))
            return False
        self.budget.count_manifest(len(body), len(self.manifest.segments))
        return True

    async def _finish(self, reason: EndReason) -> None:
        assert self.manifest is not None
        self.manifest.status = "complete"
        await self._write_manifest(self._manifest_body())
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


class SessionWriter:
    """Keeps each recording's `session.json` current, coalescing bursts of changes."""

    def __init__(self, store: Spool) -> None:
        self.store = store
        self.indexes: dict[RecordingId, SessionIndex] = {}
        self.locks: dict[RecordingId, asyncio.Lock] = {}
        self.versions: dict[RecordingId, tuple[int, int]] = {}
        self.writes: set[asyncio.Task[None]] = set()

    def record(self, stream: StreamId, manifest: StreamManifest, status: StreamStatus) -> None:
        recording = stream.recording
        if recording not in self.indexes:
            self.indexes[recording] = SessionIndex(recording)
            self.locks[recording] = asyncio.Lock()
        self.indexes[recording].record_stream(
            stream, manifest.context, manifest.participant, status
        )
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
            body = dump_json(self.indexes[recording].document())
            try:
                await self.store.put(recording.session_key, body, JSON_TYPE)
            except StoreError as exc:
                log.error("session_write_failed", recording=recording.prefix, error=str(exc))
                return
            self.versions[recording] = (self.versions[recording][0], wanted)

    async def flush(self) -> None:
        """Wait for every write already asked for."""
        while self.writes:
            await asyncio.gather(*self.writes, return_exceptions=True)


class StreamRegistry:
    """Every stream of this process, by id; routes messages and ends streams."""

    def __init__(
        self, settings: Settings, spool: Spool, executor: Executor, recovery: Recovery
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.executor = executor
        self.recovery = recovery
        self.sessions = SessionWriter(spool)
        self.streams: dict[StreamId, Stream] = {}

    async def dispatch(self, message: MediaMessage) -> None:
        stream = self.streams.get(message.stream)
        if stream is None:
            stream = self.streams[message.stream] = Stream(
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
        """Wait until every stream's worker has finished and every index is written."""
        while tasks := [s.task for s in self.streams.values() if s.running and s.task]:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.sessions.flush()

    async def close(self) -> None:
        await self.end(set(self.streams), "shutdown")
        await self.wait_idle()

    def unfinished(self) -> list[str]:
        """Manifest keys of streams still being written out."""
        return sorted(s.id.manifest_key for s in self.streams.values() if s.running)
