"""H.264 access units into fMP4 segments: the stream worker of the h264 media kind."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from archiver.documents.manifests import SegmentEntry, StreamManifest
from archiver.publishing import InOrderPublisher
from archiver.recovery.spooling import spool_segment
from archiver.segmenting.fmp4 import H264Segmenter, MediaSegment
from archiver.segmenting.h264 import StreamConfig
from archiver.store.spool import SpooledObject
from archiver.streams.batch import BatchResult, describe_error
from archiver.streams.continuity import Continuation, ContinuationFinder
from archiver.streams.worker import EndReason, Stream
from archiver.values import MediaMessage

log = structlog.get_logger(__name__)


class H264Stream(Stream[MediaSegment, SegmentEntry]):
    """H.264 access units into fMP4 segments, each behind its init segment."""

    published_counter = "segments"
    has_playlist = True
    spooled_inits: set[str]
    """Init segments this stream has spooled: each is stored once, not with every segment."""
    awaiting: asyncio.Task[None] | None = None
    """Polling the archive for the configuration that frames held by the segmenter need."""
    finder: ContinuationFinder
    continuation: tuple[StreamConfig, int | None, int] | None = None
    """Found by that poll, for the next batch's thread to resume the segmenter with
    (`H264Segmenter.resume`'s arguments)."""
    continuation_abandoned = False
    continuation_expected = False
    """Another writer of this stream is known to exist: its configuration is worth waiting
    for at the end, too."""

    def tasks(self) -> list[asyncio.Task[Any]]:
        found = super().tasks()
        if self.awaiting is not None:
            found.append(self.awaiting)
        return found

    def _begin(
        self, first: MediaMessage, previous: dict[str, Any] | None
    ) -> tuple[StreamManifest, H264Segmenter]:
        manifest = StreamManifest(self.id, first.context, first.participant, previous)
        segmenter = H264Segmenter(
            self.settings.segment_target_s,
            first_seq=manifest.next_seq,
            last_ticks=manifest.last_ticks,
            max_frames=self.settings.segment_max_frames,
            max_bytes=self.settings.segment_max_bytes,
            folder=self.journal_folder,
        )
        self.spooled_inits = set()
        return manifest, segmenter

    async def _carry_on(self, previous: dict[str, Any] | None) -> None:
        """Frames that land where this stream has no decoder state (a reconnect to another
        worker or task, a deploy) continue mid-GOP with the configuration the stream last
        used: that of a sibling worker's open segment, or of the last listed segment's init
        segment, whichever started later. When neither is readable yet (the previous task is
        still storing the segment that began the GOP), frames before a key frame are held
        while the archive is polled, for up to `continuation_wait_s`."""
        assert isinstance(self.segmenter, H264Segmenter)
        assert isinstance(self.manifest, StreamManifest)
        self.finder = ContinuationFinder(self.id, self.settings, self.spool, self.log)
        self.continuation = None
        self.continuation_abandoned = False
        found = await self.finder.find(self.manifest.entries[-1] if self.manifest.entries else None)
        if found is not None:
            self.segmenter.resume(*self._continue_with(found))
            return
        self.continuation_expected = await self.finder.another_writer_holds_it(previous)
        self.segmenter.await_configuration()
        self.awaiting = asyncio.create_task(self._await_continuation(), name=f"continue {self.id}")

    async def _await_continuation(self) -> None:
        """Poll while the segmenter holds frames that need a configuration; hand what is
        found to the next batch, or give up by the deadline."""
        assert isinstance(self.segmenter, H264Segmenter)
        segmenter = self.segmenter
        try:
            found = await self.finder.poll(
                lambda: segmenter.awaiting_configuration, self.settings.continuation_wait_s
            )
        except Exception:
            self.log.exception("continuation_lookup_failed")
            found = None
        if found is not None:
            self.continuation = self._continue_with(found)
            return
        if segmenter.awaiting_configuration:
            self.log.warning("stream_not_continued", held=segmenter.held_frames)
        self.continuation_abandoned = True

    def _continue_with(self, found: Continuation) -> tuple[StreamConfig, int | None, int]:
        self.counters["continuations"] += 1
        self.log.info("stream_continued", source=found.source, codec=found.config.codec)
        return found.config, found.continues_at, found.gap_ticks

    def _take_continuation(self, segmenter: H264Segmenter) -> list[MediaSegment]:
        """On the batch's thread, before its frames: what the poll found, or that it gave up.
        A key frame that came first made either moot."""
        found, self.continuation = self.continuation, None
        if found is not None and segmenter.awaiting_configuration:
            try:
                return segmenter.resume(*found)
            except Exception as exc:  # noqa: BLE001 (the held frames only, counted)
                self.log.error("stream_not_continued", error=describe_error(exc))
                segmenter.stop_awaiting()
                return []
        if self.continuation_abandoned:
            self.continuation_abandoned = False
            segmenter.stop_awaiting()
        return []

    def _segment_batch(self, batch: list[MediaMessage]) -> BatchResult[MediaSegment]:
        assert isinstance(self.segmenter, H264Segmenter)
        continued = self._take_continuation(self.segmenter)
        result = super()._segment_batch(batch)
        result.finished[:0] = continued
        return result

    def _flush_segmenter(self) -> BatchResult[MediaSegment]:
        assert isinstance(self.segmenter, H264Segmenter)
        continued = self._take_continuation(self.segmenter)
        result = super()._flush_segmenter()
        result.finished[:0] = continued
        return result

    async def _flush(self, publish: InOrderPublisher[SegmentEntry]) -> None:
        """Frames still held for a configuration at the end: where another writer is known
        (a stored manifest, a sibling's journal), wait for the poll, which is bounded;
        otherwise look once more, and let them go."""
        assert isinstance(self.segmenter, H264Segmenter)
        if self.awaiting is not None:
            if self.segmenter.awaiting_configuration and not self.continuation_expected:
                self.awaiting.cancel()
                try:
                    found = await self.finder.find(await self.finder.latest_listed())
                except Exception:
                    # The held frames go as frames before a key frame, counted; the lookup's
                    # failure is logged like the poll's.
                    self.log.exception("continuation_lookup_failed")
                    found = None
                if found is not None:
                    self.continuation = self._continue_with(found)
            elif not self.segmenter.awaiting_configuration:
                self.awaiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.awaiting
            self.awaiting = None
        await super()._flush(publish)

    async def _finish(self, reason: EndReason) -> None:
        if self.awaiting is not None:
            self.awaiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.awaiting
            self.awaiting = None
        await super()._finish(reason)

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
