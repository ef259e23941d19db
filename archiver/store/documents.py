"""Writing the JSON documents: over the version last read, merging another writer's.

A document (a stream's manifest, an events manifest, a session index) may be written by
more than one process at once: a bot that reconnected to another task, a recovery on start-up.
Each write is conditional on the version its writer last read; on a conflict the writer
takes the other's listing in and writes again, so neither side's entries are lost. A stream's
HLS playlist follows its manifest and names only what that manifest lists: this module is
the one place that writes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from archiver import metrics
from archiver.documents.manifests import JSON_TYPE, MERGE_ATTEMPTS, parse_document
from archiver.documents.playlists import CONTENT_TYPE as PLAYLIST_TYPE
from archiver.documents.playlists import render_playlist
from archiver.errors import ObjectConflictError, StoreError
from archiver.store.base import StoredObject
from archiver.store.spool import Spool

log = structlog.get_logger(__name__)


class _Puts(Protocol):
    async def put(self, key: str, body: bytes, content_type: str) -> StoredObject: ...


async def write_merging(
    spool: Spool,
    key: str,
    version: str,
    render: Callable[[], bytes | Awaitable[bytes]],
    take_in: Callable[[dict[str, Any]], object],
) -> tuple[StoredObject, bytes]:
    """Write a document over `version` (the ETag last read; "" for none yet). When another
    writer changed it meanwhile (a bot reconnected to another machine while this one still
    held it), `take_in` their document and write again: neither side's listing is lost.
    `render` may be a coroutine (one that serialises on a thread). Return what was stored
    and its bytes; raise `StoreError`. Writers of one document in this process (a stream
    and the recovery of its manifest) take turns."""
    async with spool.document_lock(key):
        for _ in range(MERGE_ATTEMPTS):
            rendered = render()
            body = rendered if isinstance(rendered, bytes) else await rendered
            try:
                stored = await spool.put(key, body, JSON_TYPE, replaces=version)
            except ObjectConflictError:
                fetched = await spool.fetch(key)
                version = "" if fetched is None else fetched[1]
                theirs = None if fetched is None else parse_document(fetched[0], key)
                if theirs is not None:
                    take_in(theirs)
                    log.info("document_merged", key=key)
                continue
            metrics.document_written(key)
            return stored, body
    raise StoreError(key, "the document kept changing under other writers")


async def write_playlist(store: _Puts, key: str, manifest: dict[str, Any]) -> int:
    """Write the HLS playlist at `key` from the manifest document just written (rendered on
    a thread); return its size. Raise `StoreError`."""
    body = (await asyncio.to_thread(render_playlist, manifest)).encode()
    await store.put(key, body, PLAYLIST_TYPE)
    return len(body)
