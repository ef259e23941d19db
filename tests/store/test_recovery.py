"""Start-up recovery from the spool states a crash can leave: every object the store holds
ends up listed, once, in order, and every document the crash caught in the spool is merged
rather than dropped."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from archiver.consumers.decode_check import check_stream
from archiver.documents.manifests import (
    JSON_TYPE,
    EventBatchEntry,
    EventsManifest,
    SegmentEntry,
    StreamManifest,
    dumps,
)
from archiver.documents.merging import events_header, stream_header
from archiver.documents.sessions import SessionIndex
from archiver.layout import RecordingId, SpoolFolders, StreamId
from archiver.recovery.replay import recover
from archiver.recovery.spooling import JSONL_TYPE, SEGMENT_TYPE, spool_segment
from archiver.segmenting.fmp4 import H264Segmenter, MediaSegment
from archiver.store import LocalFolderStore
from archiver.store.base import md5_hex, sha256_digest
from archiver.store.journal import StreamJournal
from archiver.store.spool import Spool
from archiver.tools.simulator import SimulatedStream, encode_stream, participant
from archiver.values import RecordingContext

RECORDING = RecordingId("bot-1", "rec-1")
STREAM = StreamId(RECORDING, "100", "webcam", "h264")
CONTEXT = RecordingContext(
    bot={"id": "bot-1", "metadata": {}},
    recording={"id": "rec-1", "metadata": {}},
    realtime_endpoint=None,
    video_separate=None,
)
HEADER = stream_header(STREAM, CONTEXT, participant(100))


def segment_entry(index: int, body: bytes) -> SegmentEntry:
    return SegmentEntry(
        key=STREAM.segment_key(index * 90_000),
        init_key=STREAM.init_key("0" * 64),
        seq=index,
        start=float(index),
        end=float(index + 1),
        start_wallclock=datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
        frames=10,
        starts_with_keyframe=True,
        width=320,
        height=240,
        codec="avc1.42C01F",
        bytes=len(body),
        sha256=sha256_digest(body)[0],
    )


def stream_manifest(entries: list[SegmentEntry], status: str) -> bytes:
    manifest = StreamManifest(STREAM, CONTEXT, participant(100))
    for entry in entries:
        manifest.add(entry)
    manifest.status = status  # type: ignore[assignment]
    return dumps(manifest.document({}))


async def spool_listable(spool: Spool, entry: SegmentEntry, body: bytes) -> None:
    """Spool an object its manifest is to list, and see it uploaded; its manifest is never
    written (the process dies first)."""
    extra = {"manifest_key": STREAM.manifest_key, "entry": asdict(entry), **HEADER}
    spooled = await spool.write(entry.key, body, SEGMENT_TYPE, extra, write_once=True)
    await spool.confirm(spooled)


async def restart(tmp_path: Path, store: LocalFolderStore) -> Spool:
    """A new process on the same machine: recover the spool and wait for its uploads."""
    spool = Spool(tmp_path / "spool", store, cap_bytes=1024**2)
    recovery = await recover(spool, tmp_path / "spool", target_s=1.0)
    if recovery.uploads is not None:
        await recovery.uploads
    return spool


def spool_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "spool" / "objects").glob("*"))


async def stored_json(store: LocalFolderStore, key: str) -> dict[str, Any]:
    raw = await store.get(key)
    assert raw is not None, key
    document: dict[str, Any] = orjson.loads(raw)
    return document


async def test_an_uploaded_object_keeps_its_record_not_its_bytes_until_listed(
    tmp_path: Path,
) -> None:
    store = LocalFolderStore(tmp_path / "archive")
    spool = Spool(tmp_path / "spool", store, cap_bytes=1024**2)
    body = b"segment" * 100
    entry = segment_entry(0, body)
    await spool_listable(spool, entry, body)
    assert await store.get(entry.key) == body
    assert spool.pending_bytes == 0
    assert [name.rsplit(".", 1)[1] for name in spool_files(tmp_path)] == ["meta"]

    again = Spool(tmp_path / "spool", store, cap_bytes=1024**2)
    (record,) = await again.leftovers()
    assert record.uploaded
    assert again.pending_bytes == 0
    assert again.waiting_keys() == []
    await again.listed(STREAM.manifest_key, {"some/other/key"})
    assert len(spool_files(tmp_path)) == 1
    await again.listed(STREAM.manifest_key, {entry.key})
    assert spool_files(tmp_path) == []


async def test_a_crash_while_a_record_is_rewritten_leaves_a_record_or_an_upload(
    tmp_path: Path,
) -> None:
    """Killed between marking a record uploaded and deleting its bytes, or in the middle of
    the rename: either way the object is listed once, and the spool ends empty."""
    store = LocalFolderStore(tmp_path / "archive")
    spool = Spool(tmp_path / "spool", store, cap_bytes=1024**2)
    bodies = [b"marked" * 10, b"renaming" * 10]
    entries = [segment_entry(i, body) for i, body in enumerate(bodies)]
    for entry, body in zip(entries, bodies, strict=True):
        extra = {"manifest_key": STREAM.manifest_key, "entry": asdict(entry), **HEADER}
        spooled = await spool.write(entry.key, body, SEGMENT_TYPE, extra, write_once=True)
        await store.put(entry.key, body, SEGMENT_TYPE, write_once=True)
        meta = spooled.path.with_suffix(".meta")
        marked = {**orjson.loads(meta.read_bytes()), "uploaded": True}
        if entry is entries[0]:
            meta.write_bytes(orjson.dumps(marked))  # Its bytes are still there.
        else:
            meta.with_name(meta.name + ".tmp").write_bytes(orjson.dumps(marked)[:20])

    spool = await restart(tmp_path, store)
    manifest = await stored_json(store, STREAM.manifest_key)
    assert [s["key"] for s in manifest["segments"]] == [e.key for e in entries]
    assert spool.pending_bytes == 0
    assert spool_files(tmp_path) == []


async def test_uploaded_but_unlisted_objects_are_listed_after_a_crash(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path / "archive")
    spool = Spool(tmp_path / "spool", store, cap_bytes=1024**2)
    bodies = [f"segment {i}".encode() * 50 for i in range(5)]
    entries = [segment_entry(i, body) for i, body in enumerate(bodies)]
    for entry, body in zip(entries[:2], bodies[:2], strict=True):
        await spool_listable(spool, entry, body)
    await store.put(STREAM.manifest_key, stream_manifest(entries[:2], "live"), JSON_TYPE)
    await spool.listed(STREAM.manifest_key, {e.key for e in entries[:2]})
    for entry, body in zip(entries[2:], bodies[2:], strict=True):
        await spool_listable(spool, entry, body)

    await restart(tmp_path, store)
    manifest = await stored_json(store, STREAM.manifest_key)
    assert [s["key"] for s in manifest["segments"]] == [e.key for e in entries]
    assert [s["seq"] for s in manifest["segments"]] == list(range(5))
    assert manifest["status"] == "interrupted"
    assert manifest["recovered_ranges"] == []  # stored before the crash, nothing rebuilt
    assert spool_files(tmp_path) == []


async def test_a_final_manifest_caught_in_the_spool_is_written_complete(tmp_path: Path) -> None:
    """Suspected: a spooled `complete` manifest with nothing new to list was dropped, and the
    stored manifest stayed `live`."""
    store = LocalFolderStore(tmp_path / "archive")
    bodies = [f"segment {i}".encode() for i in range(3)]
    entries = [segment_entry(i, body) for i, body in enumerate(bodies)]
    for entry, body in zip(entries, bodies, strict=True):
        await store.put(entry.key, body, SEGMENT_TYPE)
    live = stream_manifest(entries, "live")
    await store.put(STREAM.manifest_key, live, JSON_TYPE)
    spool = Spool(tmp_path / "spool", store, cap_bytes=1024**2)
    await spool.write(
        STREAM.manifest_key, stream_manifest(entries, "complete"), JSON_TYPE, replaces=md5_hex(live)
    )

    await restart(tmp_path, store)
    manifest = await stored_json(store, STREAM.manifest_key)
    assert manifest["status"] == "complete"
    assert [s["key"] for s in manifest["segments"]] == [e.key for e in entries]
    assert spool_files(tmp_path) == []


async def test_events_manifest_and_session_index_caught_in_the_spool_are_merged(
    tmp_path: Path,
) -> None:
    """Suspected: documents without a `format` field (the events manifest, `session.json`)
    were dropped rather than merged."""
    store = LocalFolderStore(tmp_path / "archive")
    old_index = SessionIndex(RECORDING)
    old_index.record_presence("100", participant(100), True, {"relative": 0.0})
    await store.put(RECORDING.session_key, dumps(old_index.document()), JSON_TYPE)
    spool = Spool(tmp_path / "spool", store, cap_bytes=1024**2)
    index = SessionIndex(RECORDING)
    index.record_presence("101", participant(101), True, {"relative": 5.0})
    await spool.write(
        RECORDING.session_key, dumps(index.document()), JSON_TYPE, replaces="unconfirmed"
    )
    body = b'{"event":"transcript.data"}\n'
    batch = EventBatchEntry(
        key=RECORDING.events_batch_key(0, 0, "abcd0123"),
        seq=0,
        count=1,
        first_relative=None,
        last_relative=None,
        bytes=len(body),
        sha256=sha256_digest(body)[0],
        event_types={"transcript.data": 1},
    )
    await store.put(batch.key, body, JSONL_TYPE)
    events = EventsManifest(RECORDING)
    events.add(batch)
    events.status = "complete"
    await spool.write(
        RECORDING.events_manifest_key, dumps(events.document({"events": 1})), JSON_TYPE, replaces=""
    )

    await restart(tmp_path, store)
    session = await stored_json(store, RECORDING.session_key)
    joins = {p["id"]: p["joins"] for p in session["participants"]}
    assert joins == {"100": [{"relative": 0.0}], "101": [{"relative": 5.0}]}
    manifest = await stored_json(store, RECORDING.events_manifest_key)
    assert [b["key"] for b in manifest["batches"]] == [batch.key]
    assert manifest["status"] == "complete"
    assert manifest["counters"]["events"] == 1
    assert spool_files(tmp_path) == []


def two_segments_journaled(tmp_path: Path) -> list[MediaSegment]:
    """Segment a stream with its journal, as a worker does; the journal files stay."""
    plan = SimulatedStream(100, "webcam", [(0.0, (320, 240))])
    units = list(encode_stream(plan, 2.5, 10, keyframe_interval_s=1))
    folder = SpoolFolders(tmp_path / "spool").journal(STREAM.journal_name)
    journal = StreamJournal(folder, HEADER)
    segmenter = H264Segmenter(1.0, journal=journal)
    start = datetime.now(UTC)
    finished: list[MediaSegment] = []
    for relative, data, _ in units:
        finished.extend(segmenter.push(data, relative, start))
    journal.close(remove=False)
    return finished


async def test_a_segment_spooled_before_its_journal_was_discarded_is_listed_once(
    tmp_path: Path,
) -> None:
    """Suspected: a crash between spooling a segment and discarding its journal file made
    recovery rebuild the same segment under the same key and list it twice."""
    store = LocalFolderStore(tmp_path / "archive")
    spool = Spool(tmp_path / "spool", store, cap_bytes=16 * 1024**2)
    finished = await asyncio.to_thread(two_segments_journaled, tmp_path)
    assert len(finished) == 2
    for segment in finished:
        _, spooled = await spool_segment(spool, STREAM, segment, HEADER)
        # The first one even reached the store; neither journal file was discarded.
        if segment is finished[0]:
            for spooled_object in spooled:
                await spool.confirm(spooled_object)

    await restart(tmp_path, store)
    check = await check_stream(store, STREAM.manifest_key)
    assert check.ok, check.problems
    keys = [s["key"] for s in check.manifest["segments"]]
    assert len(keys) == len(set(keys)) == 3
    assert [s["recovered"] for s in check.manifest["segments"]] == [False, False, True]
    assert len(check.frames) == 25
    assert spool_files(tmp_path) == []


async def test_events_journal_of_a_batch_already_spooled_is_not_listed_twice(
    tmp_path: Path,
) -> None:
    store = LocalFolderStore(tmp_path / "archive")
    spool = Spool(tmp_path / "spool", store, cap_bytes=1024**2)
    lines = [orjson.dumps({"event": "transcript.data", "n": n}) for n in range(3)]
    folder = SpoolFolders(tmp_path / "spool").journal(RECORDING.journal_name)
    journal = StreamJournal(folder, events_header(RECORDING))
    journal.begin("00000000000000000001", None)
    for line in lines:
        journal.record(float("nan"), datetime.fromtimestamp(0, UTC), line)
    journal.close(remove=False)
    body = b"\n".join(lines) + b"\n"
    batch = EventBatchEntry(
        key=RECORDING.events_batch_key(0, 0, "abcd0123"),
        seq=0,
        count=3,
        first_relative=None,
        last_relative=None,
        bytes=len(body),
        sha256=sha256_digest(body)[0],
        event_types={"transcript.data": 3},
    )
    extra = {
        "manifest_key": RECORDING.events_manifest_key,
        "entry": asdict(batch),
        **events_header(RECORDING),
    }
    await spool.write(batch.key, body, JSONL_TYPE, extra, write_once=True)

    await restart(tmp_path, store)
    manifest = await stored_json(store, RECORDING.events_manifest_key)
    assert [b["key"] for b in manifest["batches"]] == [batch.key]
    assert manifest["events"] == 3


async def test_a_journal_that_breaks_recovery_is_set_aside_and_the_rest_recovered(
    tmp_path: Path,
) -> None:
    """No crash loop: a journal whose header recovery cannot use must not stop every start
    of the service; it is kept aside for a person, the healthy journals are recovered."""
    store = LocalFolderStore(tmp_path / "archive")
    finished = await asyncio.to_thread(two_segments_journaled, tmp_path)
    broken = SpoolFolders(tmp_path / "spool").journal("broken-stream")
    broken.mkdir(parents=True)
    (broken / "stream.json").write_bytes(orjson.dumps({"bot_id": "bot-1"}))
    (broken / "0000000000000.jnl").write_bytes(b"\x00" * 40)

    await restart(tmp_path, store)
    check = await check_stream(store, STREAM.manifest_key)
    assert check.ok, check.problems
    assert len(check.frames) == 25
    assert len(finished) == 2
    aside = tmp_path / "spool" / "journal-unrecoverable" / "broken-stream"
    assert (aside / "stream.json").is_file()
    assert not broken.exists()
