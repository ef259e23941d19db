"""Moving what the fallback store holds back into the primary.

Media (segments, init segments, PNG and events batches) are write-once: each is copied to
the primary under its key, never over different bytes, and deleted from the fallback once
the primary confirmed it. Documents (stream manifests, events manifests, session indexes)
are merged with the primary's version by a conditional write, the way two writers of one
document merge, after the media they may list; a fallback copy is deleted only if it is
still the version that was merged. Any number of processes may reconcile one fallback at
once: a second mover finds an object gone or already stored with the same bytes, and a
document merged twice lists each object once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from archiver.documents.manifests import JSON_TYPE, MERGE_ATTEMPTS, parse_document
from archiver.documents.merging import merge_documents
from archiver.documents.playlists import CONTENT_TYPE as PLAYLIST_TYPE
from archiver.documents.playlists import participant_streams, render_participant_playlist
from archiver.errors import ObjectConflictError, StoreError
from archiver.layout import MANIFEST_NAME, PLAYLIST_NAME, SESSION_NAME, beside, object_name
from archiver.store.base import ListingStore, ObjectStore
from archiver.store.documents import write_playlist
from archiver.store.moves import move_write_once

log = structlog.get_logger(__name__)

PROBE_KEY = ".reachable"
"""A key the service never writes: reading it tells whether the primary answers."""
_DOCUMENT_NAMES = (MANIFEST_NAME, SESSION_NAME)
"""Derived from its stream's manifest: rebuilt from the merged one, never merged itself."""


@dataclass(slots=True)
class ReconcileReport:
    """What one pass moved, and what it had to leave in the fallback."""

    moved_objects: int = 0
    moved_bytes: int = 0
    merged_documents: int = 0
    left: list[str] = field(default_factory=list)
    """Keys still in the fallback after the pass, with the reason logged."""
    seconds: float = 0.0

    @property
    def moved(self) -> int:
        return self.moved_objects + self.merged_documents


def is_document(key: str) -> bool:
    return object_name(key) in _DOCUMENT_NAMES


def is_playlist(key: str) -> bool:
    return object_name(key) == PLAYLIST_NAME


def is_participant_playlist(key: str) -> bool:
    """`{recording}/participants/{id}/playlist.m3u8`, beside no manifest: a stream's
    playlist sits two folders deeper, under its source and format."""
    parts = key.split("/")
    return len(parts) >= 3 and parts[-3] == "participants" and is_playlist(key)


def _document_order(keys: Iterable[str]) -> list[str]:
    """Stream and events manifests before session indexes, which carry their statuses."""
    return sorted(keys, key=lambda key: (key.endswith("session.json"), key))


async def reconcile(primary: ObjectStore, fallback: ListingStore) -> ReconcileReport:
    """One pass over the fallback: move every object it holds into the primary; raise
    `StoreError` when either store cannot be listed or reached at all."""
    started = time.monotonic()
    report = ReconcileReport()
    keys = await fallback.list_keys("")
    media = [key for key in keys if not is_document(key) and not is_playlist(key)]
    documents = _document_order(key for key in keys if is_document(key))
    for key in media:
        await _move_media(primary, fallback, key, report)
    if documents:
        # Media that reached the fallback while the first ones moved, and that a document
        # read below may already list.
        for key in await fallback.list_keys(""):
            if not is_document(key) and not is_playlist(key) and key not in media:
                await _move_media(primary, fallback, key, report)
    for key in documents:
        try:
            await _move_document(primary, fallback, key, report)
        except StoreError as exc:
            report.left.append(key)
            log.error("reconcile_document_failed", key=key, error=str(exc))
    for key in (key for key in keys if is_playlist(key)):
        rebuild = (
            _rebuild_participant_playlist if is_participant_playlist(key) else _rebuild_playlist
        )
        try:
            await rebuild(primary, fallback, key, report)
        except StoreError as exc:
            report.left.append(key)
            log.error("reconcile_document_failed", key=key, error=str(exc))
    report.seconds = round(time.monotonic() - started, 3)
    return report


async def _move_media(
    primary: ObjectStore, fallback: ListingStore, key: str, report: ReconcileReport
) -> None:
    try:
        body_size = await move_write_once(fallback, primary, key)
    except ObjectConflictError as exc:
        report.left.append(key)
        log.error("reconcile_conflict", key=key, error=exc.cause)
        return
    except StoreError as exc:
        report.left.append(key)
        log.error("reconcile_object_failed", key=key, error=str(exc))
        return
    if body_size is not None:
        report.moved_objects += 1
        report.moved_bytes += body_size


async def _move_document(
    primary: ObjectStore, fallback: ListingStore, key: str, report: ReconcileReport
) -> None:
    fetched = await fallback.fetch(key)
    if fetched is None:
        return  # Another reconciler merged it first.
    body, version = fetched
    for _ in range(MERGE_ATTEMPTS):
        current = await primary.fetch(key)
        merged = body
        if current is not None:
            merged = await asyncio.to_thread(merge_documents, key, body, current[0])
        try:
            await primary.put(
                key, merged, JSON_TYPE, replaces="" if current is None else current[1]
            )
            break
        except ObjectConflictError:
            continue
    else:
        raise StoreError(key, "the primary's document kept changing")
    report.merged_documents += 1
    if not await fallback.delete(key, if_match=version):
        # A writer put a newer version there meanwhile: the next pass merges that one.
        report.left.append(key)


async def _rebuild_playlist(
    primary: ObjectStore, fallback: ListingStore, key: str, report: ReconcileReport
) -> None:
    """A playlist in the fallback only says its manifest changed: write the one the merged
    manifest in the primary gives, then let the fallback's copy go."""
    manifest_key = beside(key, MANIFEST_NAME)
    fetched = await primary.fetch(manifest_key)
    manifest = None if fetched is None else parse_document(fetched[0], manifest_key)
    if manifest is None:
        report.left.append(key)  # Its manifest is not in the primary yet: the next pass.
        return
    await write_playlist(primary, key, manifest)
    await fallback.delete(key)
    report.merged_documents += 1


async def _rebuild_participant_playlist(
    primary: ObjectStore, fallback: ListingStore, key: str, report: ReconcileReport
) -> None:
    """A participant's multivariant playlist follows the recording's session index: write
    the one the merged index in the primary gives, then let the fallback's copy go."""
    folder = key.rpartition("/")[0]
    recording_prefix, _, participant_id = folder.rpartition("/participants/")
    session_key = f"{recording_prefix}/{SESSION_NAME}"
    fetched = await primary.fetch(session_key)
    session = None if fetched is None else parse_document(fetched[0], session_key)
    if session is None:
        report.left.append(key)  # Its session index is not in the primary yet: the next pass.
        return
    text = render_participant_playlist(folder, participant_streams(session, participant_id))
    if text is not None:
        await primary.put(key, text.encode(), PLAYLIST_TYPE)
    await fallback.delete(key)
    report.merged_documents += 1


async def primary_answers(primary: ObjectStore) -> bool:
    """Whether the primary answers a read (of a key that is never written)."""
    try:
        await primary.fetch(PROBE_KEY)
    except StoreError:
        return False
    return True
