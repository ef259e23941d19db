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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import structlog

from archiver import metrics
from archiver.documents.manifests import (
    MANIFEST_TYPES,
    AudioSegmentEntry,
    EventBatchEntry,
    EventsManifest,
    PngBatchEntry,
    SegmentEntry,
    StreamStatus,
    dumps,
    parse_document,
)
from archiver.documents.merging import (
    document_header,
    stream_from_header,
)
from archiver.documents.sessions import SessionIndex
from archiver.errors import InputError, SegmenterFailure, StoreError
from archiver.layout import (
    AUDIO_FORMATS,
    AudioFormat,
    RecordingId,
    SpoolFolders,
    StreamId,
    key_micros,
)
from archiver.recovery.spooling import (
    JSONL_TYPE,
    Recovery,
    spool_audio_segment,
    spool_batch,
    spool_segment,
)
from archiver.segmenting.audio import AudioSegmenter
from archiver.segmenting.base import FinishedT, Segmenter
from archiver.segmenting.fmp4 import H264Segmenter
from archiver.segmenting.h264 import StreamConfig
from archiver.segmenting.png import PngBatcher
from archiver.store.base import sha256_digest
from archiver.store.documents import write_merging, write_playlist
from archiver.store.journal import read_segment, stream_folders
from archiver.store.spool import Spool, SpooledObject

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Listing:
    """What recovery writes into one document: the entries to add, and the newest version
    of the document itself that a previous process spooled but never saw stored."""

    header: dict[str, Any]
    entries: list[dict[str, Any]] = field(default_factory=list)
    document: dict[str, Any] | None = None
    spooled: list[SpooledObject] = field(default_factory=list)
    """Spooled versions of the document: dropped once the merged version is stored."""

    def knows(self, key: str, sha256: str | None = None) -> bool:
        """Whether an entry with this key (or these bytes) is already to be listed: a
        journal replayed after its segment reached the spool must not list it twice."""
        return any(e["key"] == key or e["sha256"] == sha256 for e in self.entries)


async def recover(
    spool: Spool, spool_dir: Path, target_s: float, adopted: Sequence[Path] = ()
) -> Recovery:
    """Replay journals and leftovers into the spool now; upload them in the background.
    `adopted`: spool folders of dead workers this process took over (`archiver.host.workers`),
    recovered along with its own."""
    recovery = Recovery()
    leftovers = await spool.leftovers(adopted)
    recovery.leftover_objects = sum(not spooled.uploaded for spooled in leftovers)
    recovery.unlisted_objects = sum(spooled.uploaded for spooled in leftovers)
    listings: dict[str, _Listing] = {}
    for spooled in leftovers:
        extra = spooled.extra or {}
        if spooled.replaces is not None:
            # A document version never confirmed: another machine may have written since,
            # so it is merged into what is stored rather than sent as is.
            await _take_in_document(spool, spooled, listings)
            continue
        if spooled.listing is not None:
            listings.setdefault(extra["manifest_key"], _Listing(extra)).entries.append(
                extra["entry"]
            )

    replayed: list[SpooledObject] = []
    roots = [SpoolFolders(folder).journals for folder in [spool_dir, *adopted]]
    journals = await asyncio.to_thread(
        lambda: [found for root in roots for found in stream_folders(root)]
    )
    for folder, header in journals:
        try:
            await _recover_journal(spool, folder, header, target_s, listings, recovery, replayed)
        except Exception:
            # One stream's journal must not keep the service from starting, every time:
            # it is set aside for a person to look at, and the rest is recovered.
            log.exception("journal_unrecoverable", folder=folder.name)
            await asyncio.to_thread(_set_aside, folder, SpoolFolders(spool_dir).unrecoverable)

    listings = {
        key: listing for key, listing in listings.items() if listing.entries or listing.spooled
    }
    recovery.manifests = set(listings)
    unsent = [spooled for spooled in leftovers if spooled.replaces is None and not spooled.uploaded]
    backlog = sorted([*unsent, *replayed], key=lambda s: s.seq)
    if backlog or listings:
        recovery.uploads = asyncio.create_task(_upload_then_list(spool, backlog, listings))
        log.warning(
            "recovering",
            leftover_objects=recovery.leftover_objects,
            unlisted_objects=recovery.unlisted_objects,
            replayed_segments=recovery.replayed_segments,
            replayed_frames=recovery.replayed_frames,
            replayed_event_batches=recovery.replayed_event_batches,
            manifests=sorted(recovery.manifests),
        )
    return recovery


async def _recover_journal(
    spool: Spool,
    folder: Path,
    header: dict[str, Any],
    target_s: float,
    listings: dict[str, _Listing],
    recovery: Recovery,
    replayed: list[SpooledObject],
) -> None:
    """Turn one stream's (or one recording's events) journal into spooled objects and the
    entries that list them, then remove it."""
    if header.get("kind") == "events":
        recording = RecordingId(header["bot_id"], header["recording_id"])
        listing = listings.setdefault(recording.events_manifest_key, _Listing(header))
        for batch_entry, spooled in await _spool_journaled_events(
            spool, recording, folder, header, listing
        ):
            replayed.append(spooled)
            listing.entries.append(asdict(batch_entry))
            recovery.replayed_event_batches += 1
        await asyncio.to_thread(shutil.rmtree, folder, True)
        return
    stream, _, _ = stream_from_header(header)
    listing = listings.setdefault(stream.manifest_key, _Listing(header))
    stored: list[tuple[SegmentEntry | PngBatchEntry | AudioSegmentEntry, list[SpooledObject]]]
    stored = []
    if stream.media_format in AUDIO_FORMATS:
        pieces, frames = await asyncio.to_thread(_replay, folder, _audio_for_replay)
        for piece in pieces:
            if not listing.knows(spool.location(stream.segment_key(piece.start_sample))):
                stored.append(
                    await spool_audio_segment(spool, stream, piece, header, recovered=True)
                )
    elif stream.media_format == "png":
        batches, frames = await asyncio.to_thread(_replay, folder, _batcher_for_replay)
        for batch in batches:
            if not listing.knows(spool.location(stream.batch_key(batch.start_micros))):
                stored.append(await spool_batch(spool, stream, batch, header, recovered=True))
    else:
        start = functools.partial(_segmenter_for_replay, target_s)
        segments, frames = await asyncio.to_thread(_replay, folder, start)
        for segment in segments:
            if not listing.knows(spool.location(stream.segment_key(segment.start_ticks))):
                stored.append(await spool_segment(spool, stream, segment, header, recovered=True))
    recovery.replayed_frames += frames
    metrics.frames_recovered(stream.media_format, frames)
    for entry, objects in stored:
        replayed.extend(objects)
        listing.entries.append(asdict(entry))
    recovery.replayed_segments += len(stored)
    await asyncio.to_thread(shutil.rmtree, folder, True)


def _set_aside(folder: Path, aside: Path) -> None:
    try:
        aside.mkdir(parents=True, exist_ok=True)
        folder.rename(aside / folder.name)
    except OSError as exc:
        log.error("journal_not_set_aside", folder=folder.name, error=str(exc))
        shutil.rmtree(folder, ignore_errors=True)


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


def _audio_for_replay(config: dict[str, Any] | None) -> AudioSegmenter:
    """One journal file holds one segment's chunks as they were placed: joined again as
    they are, nothing cut, refused for its size or re-timed."""
    codec: AudioFormat = "opus" if (config or {}).get("codec") == "opus" else "flac"
    return AudioSegmenter(codec, 1e9, fill_s=1e9, max_chunk_s=1e9, drift_s=1e9)


def _batcher_for_replay(config: dict[str, Any] | None) -> PngBatcher:
    """One journal file holds one batch: nothing inside it is cut again."""
    return PngBatcher(max_frames=2**31, max_s=1e9)


async def _upload_then_list(
    spool: Spool, backlog: list[SpooledObject], listings: dict[str, _Listing]
) -> None:
    """Upload in spool order, then add what was recovered to each manifest: a manifest
    never names an object before the store has it. Runs while the service takes bots;
    through an S3 outage it simply waits. What a previous process spooled of a document is
    dropped, and the records of what it lists forgotten, only once the merged version is
    stored."""
    moved: dict[str, str] = {}
    for spooled in backlog:
        _, key = await spool.confirm_where(spooled)
        if key != spooled.key:
            moved[spool.location(spooled.key)] = spool.location(key)
    for listing in listings.values():
        for entry in listing.entries:
            if entry.get("key") in moved:
                entry["key"] = moved[entry["key"]]
    statuses: dict[str, StreamStatus] = {}
    sessions = [key for key, listing in listings.items() if listing.header.get("kind") == "session"]
    for manifest_key in [*[key for key in listings if key not in sessions], *sessions]:
        listing = listings[manifest_key]
        try:
            kind = listing.header.get("kind")
            if kind == "session":
                await _merge_session(spool, manifest_key, listing, statuses)
                listed: set[str] = set()
            elif kind == "events":
                listed = await _list_events(spool, manifest_key, listing)
            else:
                listed, statuses[manifest_key] = await _list_stream(spool, manifest_key, listing)
        except StoreError as exc:
            log.error("recovered_listing_failed", key=manifest_key, error=str(exc))
            continue
        except Exception:
            # A bug of ours with one document: the others are still listed.
            log.exception("recovered_listing_failed", key=manifest_key)
            continue
        await spool.listed(manifest_key, listed)
        for spooled in listing.spooled:
            await spool.drop(spooled)
    log.info("recovery_uploaded", objects=len(backlog), manifests=len(listings))


def _status(listing: _Listing, added: int) -> StreamStatus:
    """`complete` when all that was missing is the confirmation of a final manifest;
    anything else recovery had to add means the stream was cut short."""
    document = listing.document
    if document is not None and document.get("status") == "complete" and not added:
        return "complete"
    return "interrupted"


async def _list_stream(
    spool: Spool, manifest_key: str, listing: _Listing
) -> tuple[set[str], StreamStatus]:
    """Merge recovered entries into the stored manifest (or into the newer version this
    machine spooled), written over the version read: a stream continuing on another machine
    may be writing it too. Returns the keys listed and the status written."""
    stream, context, participant = stream_from_header(listing.header)
    stored, etag = await _read_when_reachable(spool, manifest_key)
    manifest = MANIFEST_TYPES[stream.media_format](
        stream, context, participant, listing.document or stored
    )
    if listing.document is not None and stored is not None:
        manifest.merge([manifest.entry_from(d) for d in stored.get(manifest.entries_name, [])])
    added = manifest.merge([manifest.entry_from(e) for e in listing.entries])
    if not added and listing.document is None and stored is not None:
        await _write_playlist(spool, stream, stored)
        return manifest.listed_keys(), stored.get("status", "interrupted")
    manifest.status = _status(listing, added)
    written: dict[str, Any] = {}

    def render() -> bytes:
        written.clear()
        written.update(manifest.document({}))
        return dumps(written)

    await write_merging(
        spool,
        manifest_key,
        etag,
        render,
        lambda theirs: manifest.merge(
            [manifest.entry_from(d) for d in theirs.get(manifest.entries_name, [])]
        ),
    )
    await _write_playlist(spool, stream, written)
    return manifest.listed_keys(), manifest.status


async def _write_playlist(spool: Spool, stream: StreamId, manifest: dict[str, Any]) -> None:
    """The playlist names what the manifest recovery wrote lists: the dead process wrote
    its last one, if at all, before the segments recovery added."""
    if stream.media_format == "png":
        return
    await write_playlist(spool, stream.playlist_key, manifest)


async def _take_in_document(
    spool: Spool, spooled: SpooledObject, listings: dict[str, _Listing]
) -> None:
    """A stream manifest, events manifest or session index that was spooled but never
    confirmed: what it lists is merged into the stored version."""
    body = await asyncio.to_thread(spool.read, spooled)
    document = parse_document(body, spooled.key) if body is not None else None
    header = document_header(spooled.key, document)
    if not header:
        log.warning("spooled_document_unreadable", key=spooled.key)
        await spool.drop(spooled)
        return
    listing = listings.setdefault(spooled.key, _Listing(header))
    listing.document = document
    listing.spooled.append(spooled)


async def _merge_session(
    spool: Spool, key: str, listing: _Listing, statuses: dict[str, StreamStatus]
) -> None:
    """A session index this machine spooled (participants, joins and leaves, streams) is
    merged with the stored one; streams whose manifests recovery wrote carry its status."""
    assert listing.document is not None
    recording = RecordingId(listing.header["bot_id"], listing.header["recording_id"])
    index = SessionIndex(recording)
    index.resume(listing.document)
    # What the dead process wrote of its own streams is newer than what the store has.
    index.own.update(index.streams)
    if index.events is not None:
        index.own.add(recording.events_manifest_key)
    stored, etag = await _read_when_reachable(spool, key)
    if stored is not None:
        index.resume(stored)
    for manifest_key, status in statuses.items():
        if manifest_key in index.streams:
            index.streams[manifest_key] = {**index.streams[manifest_key], "status": status}
    await write_merging(spool, key, etag, lambda: dumps(index.document()), index.resume)


async def _read_when_reachable(spool: Spool, key: str) -> tuple[dict[str, Any] | None, str]:
    """The current manifest and its version; merging into anything less would drop what it
    lists."""
    delay = spool.backoff_s
    while True:
        if spool.using_fallback:
            # What the primary holds is merged in later, when the fallback's copy of the
            # document is moved back: nothing waits here for a store that is gone.
            return None, ""
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
    spool: Spool, recording: RecordingId, folder: Path, header: dict[str, Any], known: _Listing
) -> list[tuple[EventBatchEntry, SpooledObject]]:
    """Each journal file is an events batch that was still open: store it as it stood,
    unless it reached the spool before the crash (the same events, under their own key)."""
    stored = []
    for path in sorted(await asyncio.to_thread(lambda: list(folder.glob("*.jnl")))):
        journaled = await asyncio.to_thread(read_segment, path)
        if not journaled.frames:
            continue
        lines = [frame.data for frame in journaled.frames]
        times = [f.relative_s for f in journaled.frames if not math.isnan(f.relative_s)]
        body = b"\n".join(lines) + b"\n"
        first = times[0] if times else None
        key = recording.recovered_events_batch_key(key_micros(first), path.stem)
        sha256 = sha256_digest(body)[0]
        if known.knows(spool.location(key), sha256):
            continue
        entry = EventBatchEntry(
            key=spool.location(key),
            seq=0,
            count=len(lines),
            first_relative=first,
            last_relative=times[-1] if times else None,
            bytes=len(body),
            sha256=sha256,
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


async def _list_events(spool: Spool, manifest_key: str, listing: _Listing) -> set[str]:
    header = listing.header
    recording = RecordingId(header["bot_id"], header["recording_id"])
    stored, etag = await _read_when_reachable(spool, manifest_key)
    manifest = EventsManifest(recording, listing.document or stored)
    if listing.document is not None and stored is not None:
        manifest.merge([EventBatchEntry(**batch) for batch in stored.get("batches", [])])
    added = manifest.merge([EventBatchEntry(**entry) for entry in listing.entries])
    if not added and listing.document is None and stored is not None:
        return manifest.listed_keys()
    manifest.status = _status(listing, added)
    # Every event a crashed process received was journaled, so it is listed now: the
    # counters cover at least what is listed.
    carried = manifest.carried_counters
    recovered = {
        "events": max(0, sum(b.count for b in manifest.batches) - carried.get("events", 0)),
        "batches": max(0, len(manifest.batches) - carried.get("batches", 0)),
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
    return manifest.listed_keys()
