"""How a writer hands an object over so that recovery can finish it: every segment, batch
and events batch is spooled with its manifest entry and the header of its stream, so a
process that starts on this spool after a crash lists it where it belongs (`replay`).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from archiver.documents.manifests import (
    AudioSegmentEntry,
    PngBatchEntry,
    SegmentEntry,
)
from archiver.layout import StreamId
from archiver.segmenting.audio import AudioSegment
from archiver.segmenting.fmp4 import MediaSegment
from archiver.segmenting.png import PngBatch
from archiver.store.base import sha256_digest
from archiver.store.spool import Spool, SpooledObject

log = structlog.get_logger(__name__)

MP4_TYPE = "video/mp4"
SEGMENT_TYPE = "video/iso.segment"
TAR_TYPE = "application/x-tar"
JSONL_TYPE = "application/x-ndjson"


async def spool_segment(
    spool: Spool,
    stream: StreamId,
    segment: MediaSegment,
    header: dict[str, Any],
    recovered: bool = False,
    with_init: bool = True,
) -> tuple[SegmentEntry, list[SpooledObject]]:
    """Put a segment and its init segment in the spool; the returned entry goes into the
    manifest once both are confirmed. The spooled copy carries the entry, so a crash
    before the manifest is written cannot orphan the segment."""
    init_key = stream.init_key(segment.init_sha256)
    key = stream.segment_key(segment.start_ticks)
    entry = SegmentEntry.stored(
        segment,
        key=spool.location(key),
        init_key=spool.location(init_key),
        size=segment.size,
        sha256=segment.sha256,
        recovered=recovered,
    )
    return entry, await _spool_fmp4(spool, stream, key, segment, asdict(entry), header, with_init)


async def spool_audio_segment(
    spool: Spool,
    stream: StreamId,
    segment: AudioSegment,
    header: dict[str, Any],
    recovered: bool = False,
    with_init: bool = True,
) -> tuple[AudioSegmentEntry, list[SpooledObject]]:
    """Put an audio segment and its init segment in the spool, like a video segment."""
    key = stream.segment_key(segment.start_sample)
    entry = AudioSegmentEntry.stored(
        segment,
        key=spool.location(key),
        init_key=spool.location(stream.init_key(segment.init_sha256)),
        recovered=recovered,
    )
    return entry, await _spool_fmp4(spool, stream, key, segment, asdict(entry), header, with_init)


class _Fmp4(Protocol):
    @property
    def init(self) -> bytes: ...

    @property
    def init_sha256(self) -> str: ...

    @property
    def body_path(self) -> Path | None: ...

    @property
    def body(self) -> bytes: ...

    @property
    def size(self) -> int: ...

    @property
    def sha256(self) -> str: ...


async def _spool_fmp4(
    spool: Spool,
    stream: StreamId,
    key: str,
    segment: _Fmp4,
    entry: dict[str, Any],
    header: dict[str, Any],
    with_init: bool,
) -> list[SpooledObject]:
    extra = {"manifest_key": stream.manifest_key, "entry": entry, **header}
    spooled = []
    if with_init:
        spooled.append(
            await spool.write(
                stream.init_key(segment.init_sha256),
                segment.init,
                MP4_TYPE,
                write_once=True,
                sha256=segment.init_sha256,
            )
        )
    if segment.body_path is not None:
        body = await spool.adopt(
            key, segment.body_path, segment.size, segment.sha256, SEGMENT_TYPE, extra, True
        )
    else:
        body = await spool.write(
            key, segment.body, SEGMENT_TYPE, extra, write_once=True, sha256=segment.sha256
        )
    spooled.append(body)
    return spooled


async def spool_batch(
    spool: Spool,
    stream: StreamId,
    batch: PngBatch,
    header: dict[str, Any],
    recovered: bool = False,
) -> tuple[PngBatchEntry, list[SpooledObject]]:
    """Put a PNG tar batch in the spool; like a segment, the spooled copy carries the entry
    its manifest will list."""
    key = stream.batch_key(batch.start_micros)
    entry = PngBatchEntry.stored(
        batch,
        key=spool.location(key),
        size=len(batch.body),
        sha256=sha256_digest(batch.body)[0],
        recovered=recovered,
    )
    extra = {"manifest_key": stream.manifest_key, "entry": asdict(entry), **header}
    return entry, [await spool.write(key, batch.body, TAR_TYPE, extra, write_once=True)]


@dataclass(slots=True)
class Recovery:
    """What start-up found, and the upload of it still under way."""

    replayed_frames: int = 0
    replayed_segments: int = 0
    replayed_event_batches: int = 0
    leftover_objects: int = 0
    unlisted_objects: int = 0
    """Objects the store already held that no confirmed manifest listed."""
    manifests: set[str] = field(default_factory=set)
    uploads: asyncio.Task[None] | None = None

    async def wait_for(self, manifest_key: str) -> None:
        """Hold a resuming stream until the manifest recovery wrote for it is uploaded."""
        if manifest_key in self.manifests and self.uploads is not None:
            await asyncio.shield(self.uploads)
