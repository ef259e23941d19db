"""Start-up recovery: whatever a previous process on this machine left unfinished.

Journals become segments (batches, for PNG), objects that reached the spool but never a
manifest are added to theirs, and every leftover object is uploaded in the order it was
spooled, so a manifest never reaches the store before the segments it names. Streams whose
manifests are being recovered wait for that before they continue.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import structlog

from archiver.errors import InputError, SegmenterFailure, StoreError
from archiver.ingest.messages import RecordingContext
from archiver.layout import RecordingId, StreamId
from archiver.manifests import (
    MANIFEST_TYPES,
    EventBatchEntry,
    EventsManifest,
    PngBatchEntry,
    SegmentEntry,
    dumps,
    parse_document,
    write_merging,
)
from archiver.segmenting.base import FinishedT, Segmenter
from archiver.segmenting.fmp4 import H264Segmenter, MediaSegment
from archiver.segmenting.h264 import StreamConfig
from archiver.segmenting.png import MICROS, PngBatch, PngBatcher
from archiver.store.base import sha256_digest
from archiver.store.journal import read_segment, stream_folders
from archiver.store.spool import Spool, SpooledObject

log = structlog.get_logger(__name__)

MP4_TYPE = "video/mp4"
SEGMENT_TYPE = "video/iso.segment"
TAR_TYPE = "application/x-tar"
JSONL_TYPE = "application/x-ndjson"
JOURNAL_FOLDER = "journal"


def events_header(recording: RecordingId) -> dict[str, Any]:
    """What recovery needs to know about a recording's events journal."""
    return {"kind": "events", "bot_id": recording.bot_id, "recording_id": recording.recording_id}


def stream_header(
    stream: StreamId, context: RecordingContext, participant: dict[str, Any]
) -> dict[str, Any]:
    """What recovery needs to know about a stream without its manifest."""
    return {
        "bot_id": stream.recording.bot_id,
        "recording_id": stream.recording.recording_id,
        "participant_id": stream.participant_id,
        "video_type": stream.video_type,
        "media_format": stream.media_format,
        "context": {
            "bot": context.bot,
            "recording": context.recording,
            "realtime_endpoint": context.realtime_endpoint,
            "video_separate": context.video_separate,
        },
        "participant": participant,
    }


def _from_header(header: dict[str, Any]) -> tuple[StreamId, RecordingContext, dict[str, Any]]:
    stream = StreamId(
        RecordingId(header["bot_id"], header["recording_id"]),
        header["participant_id"],
        header["video_type"],
        header["media_format"],
    )
    return stream, RecordingContext(**header["context"]), header["participant"]


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
        size=len(segment.body),
        sha256=sha256_digest(segment.body)[0],
        recovered=recovered,
    )
    extra = {"manifest_key": stream.manifest_key, "entry": asdict(entry), **header}
    spooled = []
    if with_init:
        spooled.append(await spool.write(init_key, segment.init, MP4_TYPE, write_once=True))
    spooled.append(await spool.write(key, segment.body, SEGMENT_TYPE, extra, write_once=True))
    return entry, spooled


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
    manifests: set[str] = field(default_factory=set)
    uploads: asyncio.Task[None] | None = None

    async def wait_for(self, manifest_key: str) -> None:
        """Hold a resuming stream until the manifest recovery wrote for it is uploaded."""
        if manifest_key in self.manifests and self.uploads is not None:
            await asyncio.shield(self.uploads)


async def recover(spool: Spool, spool_dir: Path, target_s: float) -> Recovery:
    """Replay journals and leftovers into the spool now; upload them in the background."""
    journal_root = spool_dir / JOURNAL_FOLDER
    recovery = Recovery()
    leftovers = await spool.leftovers()
    recovery.leftover_objects = len(leftovers)
    pending: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for spooled in leftovers:
        extra = spooled.extra or {}
        if spooled.replaces is not None:
            # A stream manifest version never confirmed: another machine may have written
            # since, so its listing is merged into what is stored rather than sent as is.
            await _take_in_manifest(spool, spooled, pending)
            continue
        if "entry" in extra:
            _, entries = pending.setdefault(extra["manifest_key"], (extra, []))
            entries.append(extra["entry"])

    replayed: list[SpooledObject] = []
    for folder, header in await asyncio.to_thread(lambda: list(stream_folders(journal_root))):
        if header.get("kind") == "events":
            recording = RecordingId(header["bot_id"], header["recording_id"])
            for batch_entry, spooled in await _spool_journaled_events(
                spool, recording, folder, header
            ):
                replayed.append(spooled)
                pending.setdefault(recording.events_manifest_key, (header, []))[1].append(
                    asdict(batch_entry)
                )
                recovery.replayed_event_batches += 1
            await asyncio.to_thread(shutil.rmtree, folder, True)
            continue
        stream, _, _ = _from_header(header)
        stored: list[tuple[SegmentEntry | PngBatchEntry, list[SpooledObject]]] = []
        if stream.media_format == "png":
            batches, frames = await asyncio.to_thread(_replay, folder, _batcher_for_replay)
            for batch in batches:
                stored.append(await spool_batch(spool, stream, batch, header, recovered=True))
        else:
            start = functools.partial(_segmenter_for_replay, target_s)
            segments, frames = await asyncio.to_thread(_replay, folder, start)
            for segment in segments:
                stored.append(await spool_segment(spool, stream, segment, header, recovered=True))
        recovery.replayed_frames += frames
        for entry, objects in stored:
            replayed.extend(objects)
            pending.setdefault(stream.manifest_key, (header, []))[1].append(asdict(entry))
        recovery.replayed_segments += len(stored)
        await asyncio.to_thread(shutil.rmtree, folder, True)

    recovery.manifests = set(pending)
    unsent = [spooled for spooled in leftovers if spooled.replaces is None]
    backlog = sorted([*unsent, *replayed], key=lambda s: s.seq)
    if backlog:
        recovery.uploads = asyncio.create_task(_upload_then_list(spool, backlog, pending))
        log.warning(
            "recovering",
            leftover_objects=recovery.leftover_objects,
            replayed_segments=recovery.replayed_segments,
            replayed_frames=recovery.replayed_frames,
            replayed_event_batches=recovery.replayed_event_batches,
            manifests=sorted(recovery.manifests),
        )
    return recovery


def _replay(
    folder: Path, start: Callable[[dict[str, Any] | None], Segmenter[FinishedT]]
) -> tuple[list[FinishedT], int]:
    """Turn each journal file of a stream back into the segment or batch it was becoming. A
    frame that fails is skipped and counted, a file that cannot be read is skipped whole:
    replay never fails the same way twice, so a crash cannot turn into a crash loop."""
    finished: list[FinishedT] = []
    skipped: Counter[str] = Counter()
    for path in sorted(folder.glob("*.jnl")):
        try:
            journaled = read_segment(path)
            segmenter = start(journaled.config)
        except Exception as exc:  # noqa: BLE001 (this file only, logged)
            log.error("journal_unreadable", file=path.name, error=repr(exc))
            skipped["unreadable_file"] += 1
            continue
        for frame in journaled.frames:
            try:
                finished.extend(segmenter.push(frame.data, frame.relative_s, frame.absolute))
            except SegmenterFailure as exc:
                finished.extend(exc.salvaged)
                skipped[exc.reason] += 1
            except InputError as exc:
                skipped[exc.reason] += 1
            except Exception:  # noqa: BLE001 (this frame only, counted)
                skipped["replay_error"] += 1
        try:
            finished.extend(segmenter.flush())
        except Exception as exc:  # noqa: BLE001 (this file's open segment only, logged)
            log.error("journal_replay_failed", file=path.name, error=repr(exc))
            skipped["replay_error"] += 1
    if skipped:
        log.warning("journal_frames_skipped", stream=folder.name, **skipped)
    return finished, sum(item.frame_count for item in finished)


def _segmenter_for_replay(target_s: float, config: dict[str, Any] | None) -> H264Segmenter:
    """One journal file holds one segment: nothing inside it is cut again."""
    segmenter = H264Segmenter(target_s=max(target_s, 1e6))
    if config is not None:
        segmenter.resume(StreamConfig.from_record(config))
    return segmenter


def _batcher_for_replay(config: dict[str, Any] | None) -> PngBatcher:
    """One journal file holds one batch: nothing inside it is cut again."""
    return PngBatcher(max_frames=2**31, max_s=1e9)


async def _upload_then_list(
    spool: Spool,
    backlog: list[SpooledObject],
    pending: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]],
) -> None:
    """Upload in spool order, then add what was recovered to each manifest: a manifest
    never names an object before the store has it. Runs while the service takes bots;
    through an S3 outage it simply waits."""
    for spooled in backlog:
        await spool.confirm(spooled)
    for manifest_key, (header, entries) in pending.items():
        try:
            if header.get("kind") == "events":
                await _list_events(spool, manifest_key, header, entries)
            else:
                await _list_stream(spool, manifest_key, header, entries)
        except StoreError as exc:
            log.error("recovered_listing_failed", key=manifest_key, error=str(exc))
    log.info("recovery_uploaded", objects=len(backlog), manifests=len(pending))


async def _list_stream(
    spool: Spool, manifest_key: str, header: dict[str, Any], entries: list[dict[str, Any]]
) -> None:
    """Merge recovered entries into the stored manifest, written over the version read (a
    stream continuing on another machine may be writing it too)."""
    stream, context, participant = _from_header(header)
    previous, etag = await _read_when_reachable(spool, manifest_key)
    manifest = MANIFEST_TYPES[stream.media_format](stream, context, participant, previous)
    if not manifest.merge([manifest.entry_from(e) for e in entries]) and previous:
        return
    manifest.status = "interrupted"
    await write_merging(
        spool,
        manifest_key,
        etag,
        lambda: dumps(manifest.document({})),
        lambda theirs: manifest.merge(
            [manifest.entry_from(d) for d in theirs.get(manifest.entries_name, [])]
        ),
    )


async def _take_in_manifest(
    spool: Spool,
    spooled: SpooledObject,
    pending: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]],
) -> None:
    body = await asyncio.to_thread(spool.read, spooled)
    await spool.drop(spooled)
    document = parse_document(body, spooled.key) if body is not None else None
    if document is None or document.get("format") not in MANIFEST_TYPES:
        return
    entries_name = MANIFEST_TYPES[document["format"]].entries_name
    header = {
        "bot_id": document["bot"]["id"],
        "recording_id": document["recording"]["id"],
        "participant_id": str(document["participant"]["id"]),
        "video_type": document["type"],
        "media_format": document["format"],
        "context": {
            "bot": document["bot"],
            "recording": document["recording"],
            "realtime_endpoint": document.get("realtime_endpoint"),
            "video_separate": document.get("video_separate"),
        },
        "participant": document["participant"],
    }
    pending.setdefault(spooled.key, (header, []))[1].extend(document.get(entries_name, []))


async def _read_when_reachable(spool: Spool, key: str) -> tuple[dict[str, Any] | None, str]:
    """The current manifest and its version; merging into anything less would drop what it
    lists."""
    delay = spool.backoff_s
    while True:
        try:
            fetched = await spool.fetch(key)
        except StoreError as exc:
            log.warning("recovery_waiting_for_store", key=key, error=str(exc))
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(spool.max_backoff_s, delay * 2)
            continue
        if fetched is None:
            return None, ""
        return parse_document(fetched[0], key), fetched[1]


async def _spool_journaled_events(
    spool: Spool, recording: RecordingId, folder: Path, header: dict[str, Any]
) -> list[tuple[EventBatchEntry, SpooledObject]]:
    """Each journal file is an events batch that was still open: store it as it stood."""
    stored = []
    for path in sorted(await asyncio.to_thread(lambda: list(folder.glob("*.jnl")))):
        journaled = await asyncio.to_thread(read_segment, path)
        if not journaled.frames:
            continue
        lines = [frame.data for frame in journaled.frames]
        times = [f.relative_s for f in journaled.frames if not math.isnan(f.relative_s)]
        body = b"\n".join(lines) + b"\n"
        first = times[0] if times else None
        key = recording.recovered_events_batch_key(
            max(0, round((first or 0.0) * MICROS)), path.stem
        )
        entry = EventBatchEntry(
            key=spool.location(key),
            seq=0,
            count=len(lines),
            first_relative=first,
            last_relative=times[-1] if times else None,
            bytes=len(body),
            sha256=sha256_digest(body)[0],
            event_types=dict(Counter(_event_name(line) for line in lines)),
            recovered=True,
        )
        extra = {"manifest_key": recording.events_manifest_key, "entry": asdict(entry), **header}
        stored.append((entry, await spool.write(key, body, JSONL_TYPE, extra, write_once=True)))
    return stored


def _event_name(line: bytes) -> str:
    try:
        event = orjson.loads(line).get("event")
    except (orjson.JSONDecodeError, AttributeError):
        return "unknown"
    return event if isinstance(event, str) else "unknown"


async def _list_events(
    spool: Spool,
    manifest_key: str,
    header: dict[str, Any],
    entries: list[dict[str, Any]],
) -> None:
    recording = RecordingId(header["bot_id"], header["recording_id"])
    previous, etag = await _read_when_reachable(spool, manifest_key)
    manifest = EventsManifest(recording, previous)
    batches = [EventBatchEntry(**entry) for entry in entries]
    added = manifest.merge(batches)
    if not added and previous is not None:
        return
    manifest.status = "interrupted"
    recovered = {
        "events": sum(b.count for b in batches if b.recovered),
        "batches": added,
        "audio_buffers_skipped": 0,
        "upload_failures": 0,
        "manifest_failures": 0,
    }
    await write_merging(
        spool,
        manifest_key,
        etag,
        lambda: dumps(manifest.document(recovered)),
        lambda theirs: manifest.merge(
            [EventBatchEntry(**batch) for batch in theirs.get("batches", [])]
        ),
    )
