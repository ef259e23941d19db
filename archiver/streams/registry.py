"""Every stream of a process, by id: routes messages to their streams and ends them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import structlog

from archiver.host.memory import FreedMemory
from archiver.layout import MediaFormat, RecordingId, StreamId
from archiver.recordings.sessions import SessionWriter
from archiver.recovery.spooling import Recovery
from archiver.settings import Settings
from archiver.store.spool import Spool
from archiver.streams.formats.audio import AudioStream
from archiver.streams.formats.h264 import H264Stream
from archiver.streams.formats.png import PngStream
from archiver.streams.queue import QueuedBytes
from archiver.streams.worker import EndReason, Phase, Stream
from archiver.values import MediaMessage

log = structlog.get_logger(__name__)

_CANCEL_ROUND_S = 0.05


_STREAM_TYPES: dict[MediaFormat, type[Stream[Any, Any]]] = {
    "h264": H264Stream,
    "png": PngStream,
    "flac": AudioStream,
    "opus": AudioStream,
}


async def cancel_until_done(
    tasks_of: Callable[[], list[asyncio.Task[Any]]], patience_s: float
) -> list[str]:
    """Cancel the tasks `tasks_of` lists until it lists none or `patience_s` has passed;
    the names of those left. Each one's failure, other than its cancellation, is logged:
    nothing ends unobserved."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + patience_s
    seen: set[asyncio.Task[Any]] = set()
    while (tasks := tasks_of()) and loop.time() < give_up:
        seen.update(tasks)
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=_CANCEL_ROUND_S)
    for task in seen:
        if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
            log.error("task_failed_while_stopping", task=task.get_name(), error=repr(exc))
    return sorted(task.get_name() for task in tasks_of())


class StreamRegistry:
    """Every stream of this process, by id; routes frames to them and ends them. Streams
    report to `sessions`, which the registry uses and does not own."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        executor: Executor,
        recovery: Recovery,
        sessions: SessionWriter,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.executor = executor
        self.recovery = recovery
        self.sessions = sessions
        self.streams: dict[StreamId, Stream[Any, Any]] = {}
        self.queued = QueuedBytes(settings.queued_bytes_total)
        self.freed_memory = FreedMemory()

    def connection_budget(self) -> QueuedBytes:
        """The queue budget of one more connection, within the process's."""
        return QueuedBytes(self.settings.connection_queued_bytes, within=self.queued)

    async def dispatch(self, message: MediaMessage, budget: QueuedBytes) -> None:
        stream = self._stream(message.stream)
        if not stream.running:
            stream.start()
        await stream.feed(message, budget)

    def _stream(self, stream_id: StreamId) -> Stream[Any, Any]:
        stream = self.streams.get(stream_id)
        if stream is None:
            stream_type = _STREAM_TYPES[stream_id.media_format]
            stream = self.streams[stream_id] = stream_type(
                stream_id,
                self.settings,
                self.spool,
                self.executor,
                self.sessions,
                self.recovery,
            )
            stream.on_ended = self._forget_if_done
        return stream

    def is_running(self, stream_id: StreamId) -> bool:
        stream = self.streams.get(stream_id)
        return stream is not None and stream.running

    def is_open(self, stream_id: StreamId) -> bool:
        """Whether the stream is running and not ending (a leave, an idle end)."""
        stream = self.streams.get(stream_id)
        return stream is not None and stream.open

    def attach(self, stream_id: StreamId) -> None:
        """A connection feeds this stream; it ends when the last such connection closes."""
        self._stream(stream_id).users += 1

    def detach(self, stream_ids: set[StreamId], reason: EndReason | None) -> None:
        """Connections no longer feed these streams; with a reason, streams no connection
        feeds any more end."""
        for stream_id in stream_ids:
            stream = self.streams.get(stream_id)
            if stream is None:
                continue
            stream.users = max(0, stream.users - 1)
            if reason is not None and not stream.users:
                stream.end(reason)
            if not stream.running:
                self._forget_if_done(stream)

    def _forget_if_done(self, stream: Stream[Any, Any]) -> None:
        """Let an ended stream go once its final manifest is stored and no connection holds
        it: a later frame starts a new worker that continues the stored manifest. Memory
        follows the live streams, not every stream the process ever saw."""
        if stream.users or stream.queue or stream.phase is not Phase.ENDED:
            return
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            self.freed_memory.release_soon()

    def end(self, stream_ids: set[StreamId], reason: EndReason) -> None:
        for stream_id in stream_ids:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.end(reason)

    def end_participant(self, recording: RecordingId, participant_id: str) -> None:
        ids = {
            s
            for s in self.streams
            if s.recording == recording and s.participant_id == participant_id
        }
        self.end(ids, "participant_left")

    async def wait_idle(self) -> None:
        """Wait until every stream's worker has finished. Cancelling the wait cancels none
        of them."""
        while tasks := [s.task for s in self.streams.values() if s.running and s.task]:
            await asyncio.wait(tasks)

    def end_all(self) -> None:
        self.end(set(self.streams), "shutdown")

    def close(self) -> None:
        """Once every stream has finished: no more trimming of freed memory."""
        self.freed_memory.close()

    def tasks(self) -> list[asyncio.Task[Any]]:
        """The streams' tasks that have not finished: workers and uploads."""
        found = [t for stream in self.streams.values() for t in stream.tasks()]
        found.extend(self.freed_memory.tasks())
        return [t for t in found if not t.done()]

    def unfinished(self) -> list[str]:
        """Manifest keys of streams still being written out."""
        return sorted(s.id.manifest_key for s in self.streams.values() if s.running)
