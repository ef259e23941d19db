"""Upload in parallel, publish in order; then write the manifest that lists what was published.

A stream (its segments or PNG batches) and a recording's events log (its batches) hand over
each spooled object with the entry that lists it. Uploads run at once, as many as the spool
allows; entries are listed strictly in the order they were handed over, and each only once
the store confirmed every object behind it, so a manifest never names what is not stored.
An upload that fails for a reason of ours costs that object only: the writer is told what
was lost, the publisher goes on. `ManifestWriter` is how each of them writes its manifest:
over the version it last read, within its write budget, and telling the spool what it lists.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Generic, Protocol, TypeVar, cast

import structlog

from archiver.documents.manifests import WriteBudget, parse_document
from archiver.store.documents import write_merging
from archiver.store.spool import Spool, SpooledObject

log = structlog.get_logger(__name__)

EntryT = TypeVar("EntryT")


class InOrderPublisher(Generic[EntryT]):
    """Owned by one writer, on the event loop; `close` waits until everything handed over
    is listed or accounted for as lost."""

    def __init__(
        self,
        spool: Spool,
        budget: WriteBudget,
        listed: Callable[[EntryT, int], Awaitable[None]],
        lost: Callable[[int, BaseException], None],
    ) -> None:
        """`listed(entry, weight)` adds a confirmed entry to its manifest; `lost(weight,
        error)` accounts for one whose upload failed. `weight` is what the writer counts
        per object (frames, events)."""
        self.spool = spool
        self.budget = budget
        self._listed = listed
        self._lost = lost
        self._queue: asyncio.Queue[tuple[asyncio.Task[EntryT], int] | None] = asyncio.Queue()
        self._uploads: set[asyncio.Task[EntryT]] = set()
        """Uploads under way, until each is done."""
        self._moved: dict[str, str] = {}
        """Init segments stored under a key of their own: where each was meant, where it is."""
        self._task = asyncio.create_task(self._publish())

    def hand_over(
        self,
        entry: EntryT,
        spooled: list[SpooledObject],
        weight: int,
        stored: Callable[[], None] | None = None,
    ) -> None:
        """Start the upload of a spooled object now; list its entry after those before it.
        `stored` is called as soon as the store holds it (for the metrics)."""
        upload = asyncio.create_task(self._confirm(entry, spooled, stored))
        self._uploads.add(upload)
        upload.add_done_callback(self._uploads.discard)
        self._queue.put_nowait((upload, weight))

    async def close(self) -> None:
        self._queue.put_nowait(None)
        await self._task

    def tasks(self) -> list[asyncio.Task[Any]]:
        """Its task and its uploads under way: what a shutdown past its deadline cancels."""
        return [self._task, *self._uploads]

    async def _confirm(
        self, entry: EntryT, spooled: list[SpooledObject], stored: Callable[[], None] | None
    ) -> EntryT:
        for spooled_object in spooled:
            _, key = await self.spool.confirm_where(spooled_object)
            self.budget.count_media(spooled_object.size)
            if key == spooled_object.key:
                continue
            # Another writer held its key with other bytes: listed where it was stored.
            if spooled_object.listing is not None:
                entry = replace(cast("Any", entry), key=self.spool.location(key))
            else:
                # An init segment: this entry and every later one naming it follow it.
                self._moved[self.spool.location(spooled_object.key)] = self.spool.location(key)
        if stored is not None:
            stored()
        return entry

    def _relocated(self, entry: EntryT) -> EntryT:
        """The entry naming its init segment where that was stored (in order, so the entry
        that carried a moved init segment is listed before any later one naming it)."""
        init_key = getattr(entry, "init_key", None)
        if init_key in self._moved:
            return cast("EntryT", replace(cast("Any", entry), init_key=self._moved[init_key]))
        return entry

    async def _publish(self) -> None:
        while (item := await self._queue.get()) is not None:
            upload, weight = item
            try:
                entry = self._relocated(await upload)
            except Exception as exc:  # noqa: BLE001 (that object only; the writer counts it)
                self._lost(weight, exc)
                continue
            try:
                await self._listed(entry, weight)
            except Exception:
                log.exception("listing_failed")  # A bug of ours: logged, the loop goes on.


class Listing(Protocol):
    """What a manifest tells its writer: how many entries it lists, and their objects."""

    @property
    def listed(self) -> int: ...

    def listed_keys(self) -> set[str]: ...


class ManifestWriter:
    """The manifest of one stream or events log: read once, then written over the version
    last read or written (merging what another writer listed meanwhile), live writes within
    the budget; after each write the spool lets go of every object it lists."""

    def __init__(self, spool: Spool, key: str, budget: WriteBudget) -> None:
        self.spool = spool
        self.key = key
        self.budget = budget
        self.version = ""
        """The ETag of the version last read or written ("" for none yet)."""

    async def load(self) -> dict[str, Any] | None:
        """The stored manifest (None for none or a corrupt one), whose version the next
        write replaces; raise `StoreError`."""
        fetched = await self.spool.fetch(self.key)
        if fetched is None:
            return None
        body, self.version = fetched
        return parse_document(body, self.key)

    def due(self, manifest: Listing) -> bool:
        """Whether a live write now keeps within the budget."""
        return self.budget.allows(manifest.listed)

    async def write(
        self,
        manifest: Listing,
        render: Callable[[], bytes | Awaitable[bytes]],
        take_in: Callable[[dict[str, Any]], object],
    ) -> bytes:
        """Write what `render` gives (see `write_merging`); return the bytes written. Raise
        `StoreError`."""
        stored, body = await write_merging(self.spool, self.key, self.version, render, take_in)
        self.version = stored.etag
        self.budget.count_manifest(len(body), manifest.listed)
        await self.spool.listed(self.key, manifest.listed_keys())
        return body
