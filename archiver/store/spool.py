"""The local spool: every object is on disk (fsynced) before it counts as written, and
leaves the disk only once the store has confirmed it.

Writing and confirming are two steps, so a stream can hand an object over, drop it from
memory and go on while the upload retries through an outage. Uploads retry with
exponential backoff and full jitter for as long as it takes; what bounds an outage is the
spool's size cap, at which `write` waits, and the wait travels back to the websocket.

An object that a manifest is to list (its record carries the manifest entry) is not
forgotten at once when the store confirms it: its bytes go, but its record stays on disk,
marked uploaded, until a manifest write that lists it is confirmed in turn (`listed`).
Manifests are rewritten on a budget, so between two writes that record is the only trace
of a stored object outside the worker's memory; recovery lists what it finds.

With a fallback store, an outage of the primary is bounded in time as well as in size: once
the primary has been unreachable for `fallback_after_s` (or at once, on `use_fallback`, as a
drain does), every upload goes to the fallback under the same key, and the object leaves
the disk when the fallback confirmed it. A document (written with `replaces`) is merged there
with what the fallback already holds (`merge_documents`), since its version was the
primary's. Write-once objects this process sent to the fallback are moved back to the primary
before a document that may list them goes there: a manifest never names what the primary
lacks. The reconciler (`archiver.store.reconcile`) moves everything else back.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import itertools
import os
import pwd
import random
import stat
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson
import structlog

from archiver import metrics
from archiver.errors import ConfigError, ObjectConflictError, StoreError
from archiver.layout import SpoolFolders, conflict_key
from archiver.store.base import ListingStore, ObjectStore, StoredObject, sha256_digest
from archiver.store.moves import move_write_once

log = structlog.get_logger(__name__)

_FALLBACK_MERGE_ATTEMPTS = 5
_DATA = ".data"
_EVACUATION_CONCURRENCY = 16
_META = ".meta"


class SpoolState(StrEnum):
    """How full the spool is; `high` makes the service unready, `full` slows the senders."""

    normal = "normal"
    high = "high"
    full = "full"


@dataclass(frozen=True, slots=True)
class SpooledObject:
    """An object safely on local disk, waiting for (or past) its upload."""

    key: str
    content_type: str
    size: int
    sha256: str
    seq: int
    path: Path
    write_once: bool = False
    replaces: str | None = None
    extra: dict[str, Any] | None = None
    uploaded: bool = False
    """The store holds it; only its record is left, until a manifest lists it."""
    in_fallback: bool = False
    """It was uploaded to the fallback store, not the primary."""

    @property
    def listing(self) -> tuple[str, str] | None:
        """(manifest key, entry key) for an object a manifest is to list, else None."""
        extra = self.extra or {}
        entry = extra.get("entry")
        if "manifest_key" not in extra or not isinstance(entry, dict):
            return None
        return extra["manifest_key"], entry["key"]


class Spool:
    """Durable outbox in front of an `ObjectStore`; the only owner of the spool folder."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        store: ObjectStore,
        cap_bytes: int,
        high_water_ratio: float = 0.8,
        backoff_s: float = 0.2,
        max_backoff_s: float = 30.0,
        concurrency: int = 8,
        fallback: ListingStore | None = None,
        fallback_after_s: float = 60.0,
        merge_documents: Callable[[str, bytes, bytes], bytes] | None = None,
        upload_read_bytes: int = 8 * 1024**2,
    ) -> None:
        self.folder = SpoolFolders(Path(directory)).objects
        self.fallback = fallback
        self.fallback_after_s = fallback_after_s
        self.merge_documents = merge_documents
        self.using_fallback = False
        """Uploads go to the fallback store until the primary is seen reachable again."""
        self.in_fallback: set[str] = set()
        """Write-once keys this process sent to the fallback and has not moved back."""
        self.unreachable_since: float | None = None
        self.writable = True
        """False after a write to the spool folder failed, until one succeeds."""
        self.write_failures: Counter[str] = Counter()
        self._pinned_to_fallback = False
        self._fallback_timer: asyncio.TimerHandle | None = None
        self.store = store
        self.cap_bytes = cap_bytes
        self.high_water_bytes = int(cap_bytes * high_water_ratio)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.pending_bytes = 0
        self.journal_bytes = 0
        self.state = SpoolState.normal
        self.store_reachable = True
        self.counters = {
            "uploaded": 0,
            "upload_retries": 0,
            "waits_for_room": 0,
            "conflicts": 0,
            "to_fallback": 0,
            "spool_write_failures": 0,
        }
        self._latest: dict[str, int] = {}
        self._unlisted: dict[str, dict[str, SpooledObject]] = {}
        """Records of uploaded objects no confirmed manifest lists yet, by manifest key and
        entry key."""
        self._documents: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._seq = itertools.count(int(time.time() * 1000) * 1000)
        self._room = asyncio.Condition()
        self._waiting_for_room = 0
        self._uploads = asyncio.Semaphore(concurrency)
        self.upload_read_bytes = upload_read_bytes
        """Bytes read back from disk for uploads at once (at least one object): segments
        that close together (every stream of a bot, cut in the same frame) take turns
        instead of all sitting in memory."""
        self._reading_bytes = 0
        self._read_room = asyncio.Condition()
        self._reachable_again = asyncio.Event()

    # Writing.

    async def write(
        self,
        key: str,
        body: bytes,
        content_type: str,
        extra: dict[str, Any] | None = None,
        write_once: bool = False,
        replaces: str | None = None,
        sha256: str | None = None,
    ) -> SpooledObject:
        """Put `body` on disk durably; waits while the spool is at its cap. `sha256` is the
        body's hex digest when the caller has it already (it is not computed twice)."""
        await self._make_room(len(body))
        digest = sha256 or sha256_digest(body)[0]
        spooled = self._new_object(
            key, content_type, len(body), digest, extra, write_once, replaces
        )
        return await self._store(spooled, functools.partial(self._write_files, spooled, body))

    async def adopt(
        self,
        key: str,
        path: Path,
        size: int,
        sha256: str,
        content_type: str,
        extra: dict[str, Any] | None = None,
        write_once: bool = False,
    ) -> SpooledObject:
        """Like `write`, for a body already complete and fsynced in a file of this spool's
        disk (a segment written as it was made): the file is moved in, not copied. It must
        not be in the spool's own folder."""
        await self._make_room(size)
        spooled = self._new_object(key, content_type, size, sha256, extra, write_once)
        return await self._store(spooled, functools.partial(self._move_in, spooled, path))

    async def _make_room(self, size: int) -> None:
        async with self._room:
            if self.pending_bytes + size > self.cap_bytes and self.pending_bytes > 0:
                self.counters["waits_for_room"] += 1
                self._waiting_for_room += 1
                try:
                    await self._room.wait_for(
                        lambda: (
                            self.pending_bytes + size <= self.cap_bytes or self.pending_bytes == 0
                        )
                    )
                finally:
                    self._waiting_for_room -= 1
            self.pending_bytes += size
            self._update_state()

    def _new_object(
        self,
        key: str,
        content_type: str,
        size: int,
        sha256: str,
        extra: dict[str, Any] | None,
        write_once: bool,
        replaces: str | None = None,
    ) -> SpooledObject:
        seq = next(self._seq)
        name = f"{seq:020d}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        return SpooledObject(
            key=key,
            content_type=content_type,
            size=size,
            sha256=sha256,
            seq=seq,
            path=self.folder / name,
            write_once=write_once,
            replaces=replaces,
            extra=extra,
        )

    async def _store(self, spooled: SpooledObject, put_files: Callable[[], None]) -> SpooledObject:
        """Run `put_files` on a thread; the object counts as written once it returned."""
        try:
            await asyncio.to_thread(put_files)
        except OSError as exc:
            self._note_write_failure(exc)
            await self._release(spooled)
            raise StoreError(spooled.key, f"spool write failed: {exc}") from exc
        if not self.writable:
            self.writable = True
            log.warning("spool_writable_again", folder=str(self.folder), **self.write_failures)
        self._latest[spooled.key] = spooled.seq
        return spooled

    def _note_write_failure(self, exc: OSError) -> None:
        """Logged once per cause (an errno), with how often it happened so far; the service
        stops taking bots while the spool cannot be written."""
        cause = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        self.writable = False
        self.counters["spool_write_failures"] += 1
        self.write_failures[cause] += 1
        if self.write_failures[cause] == 1:
            log.error(
                "spool_write_failed",
                folder=str(self.folder),
                cause=cause,
                error=str(exc),
                count=self.counters["spool_write_failures"],
            )

    def _write_files(self, spooled: SpooledObject, body: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_durably(spooled.path.with_suffix(_DATA), body)
        # The metadata file appears last: its presence means the data is complete.
        _write_durably(spooled.path.with_suffix(_META), _meta(spooled))

    def _move_in(self, spooled: SpooledObject, path: Path) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        os.replace(path, spooled.path.with_suffix(_DATA))
        _write_durably(spooled.path.with_suffix(_META), _meta(spooled))

    # Uploading.

    async def confirm(self, spooled: SpooledObject, body: bytes | None = None) -> StoredObject:
        """Upload until the store confirms; then the object leaves the spool. A newer version
        of the same key supersedes this one: it is not sent, the newer one will be. When the
        process stops first (cancellation), the object stays on disk for the next one."""
        return (await self.confirm_where(spooled, body))[0]

    async def confirm_where(
        self, spooled: SpooledObject, body: bytes | None = None
    ) -> tuple[StoredObject, str]:
        """`confirm`, and the key the object was stored under: its own, or, when that held
        other bytes (another writer's), `layout.conflict_key`'s."""
        try:
            stored, spooled = await self._upload_until_accepted(spooled, body)
        except ObjectConflictError:
            await self._forget(spooled)
            raise
        if stored is None:
            await self._forget(spooled)
            return StoredObject(spooled.key, spooled.size, spooled.sha256), spooled.key
        if spooled.listing is not None:
            await self._keep_until_listed(spooled)
        else:
            await self._forget(spooled)
        return stored, spooled.key

    async def _keep_until_listed(self, spooled: SpooledObject) -> None:
        """The store has it: free its bytes, keep its record (marked uploaded) until a
        confirmed manifest lists it. The record is rewritten before the bytes go, so a crash
        in between leaves either an upload to repeat (same bytes, same key) or a record."""
        record = replace(spooled, uploaded=True, in_fallback=spooled.key in self.in_fallback)
        try:
            await asyncio.to_thread(_mark_uploaded, record)
        except OSError as exc:
            # Still listed by this process's manifest; only a crash before then loses it.
            log.error("spool_record_failed", key=spooled.key, error=str(exc))
        listing = record.listing
        assert listing is not None
        self._unlisted.setdefault(listing[0], {})[listing[1]] = record
        async with self._room:
            self.pending_bytes -= spooled.size
            self._update_state()
            self._room.notify_all()
        if self._latest.get(spooled.key) == spooled.seq:
            del self._latest[spooled.key]

    async def listed(self, manifest_key: str, entry_keys: Collection[str]) -> None:
        """A write of `manifest_key` listing `entry_keys` is confirmed: the records of those
        objects are no longer needed."""
        records = self._unlisted.get(manifest_key)
        if not records:
            return
        done = [records.pop(key) for key in list(records) if key in entry_keys]
        if not records:
            del self._unlisted[manifest_key]
        if done:
            await asyncio.to_thread(_remove_all, [record.path for record in done])

    def unlisted(self, manifest_key: str) -> list[SpooledObject]:
        """Records of uploaded objects that no confirmed write of `manifest_key` lists yet."""
        return sorted(self._unlisted.get(manifest_key, {}).values(), key=lambda s: s.seq)

    def document_lock(self, key: str) -> asyncio.Lock:
        """One writer at a time per document in this process: a conditional write that a
        second writer's version superseded in the spool would otherwise look stored."""
        lock = self._documents.get(key)
        if lock is None:
            lock = self._documents[key] = asyncio.Lock()
        return lock

    def read(self, spooled: SpooledObject) -> bytes | None:
        """A spooled object's bytes, from disk (blocking: call it on a thread)."""
        try:
            return spooled.path.with_suffix(_DATA).read_bytes()
        except FileNotFoundError:
            return None

    async def drop(self, spooled: SpooledObject) -> None:
        """Take an object out of the spool without sending it (its content went elsewhere)."""
        await self._forget(spooled)

    async def _forget(self, spooled: SpooledObject) -> None:
        await self._release(spooled)
        if self._latest.get(spooled.key) == spooled.seq:
            del self._latest[spooled.key]

    async def _upload_until_accepted(
        self, spooled: SpooledObject, body: bytes | None
    ) -> tuple[StoredObject | None, SpooledObject]:
        """What the store confirmed (None when a newer version of the key superseded this
        one before it was sent), and the object as it was stored: under another key when
        its own held other bytes."""
        attempt = 0
        while True:
            if self._latest.get(spooled.key, spooled.seq) != spooled.seq:
                return None, spooled
            try:
                async with self._uploads, self._reading(spooled.size if body is None else 0):
                    if body is None:
                        body = await asyncio.to_thread(spooled.path.with_suffix(_DATA).read_bytes)
                    if self.using_fallback and self.fallback is not None:
                        stored = await self._put_in_fallback(self.fallback, spooled, body)
                        self.counters["to_fallback"] += 1
                        metrics.fallback_used()
                        return stored, spooled
                    if spooled.replaces is not None and self.in_fallback:
                        await self._bring_back()
                    started = time.monotonic()
                    stored = await self.store.put(
                        spooled.key,
                        body,
                        spooled.content_type,
                        spooled.write_once,
                        spooled.replaces,
                        sha256=spooled.sha256,
                    )
                    metrics.upload_stored(time.monotonic() - started)
            except ObjectConflictError as exc:
                if spooled.replaces is not None:
                    raise  # The writer merges with what is there and writes again.
                # Overwriting is never allowed, and listing these bytes under a key that
                # holds others would lie: they go under a key of their own.
                self.counters["conflicts"] += 1
                moved = conflict_key(spooled.key, spooled.sha256)
                log.error("object_conflict", key=exc.key, error=exc.cause, stored_as=moved)
                if moved == spooled.key:
                    raise
                spooled = self._rekeyed(spooled, moved)
                continue
            except StoreError as exc:
                body = None  # Do not hold a failed object in memory through an outage.
                attempt += 1
                self.counters["upload_retries"] += 1
                metrics.upload_retried()
                if not self.using_fallback:
                    self._mark_store(reachable=False, error=str(exc))
                elif attempt == 1:
                    log.error("fallback_store_failed", key=spooled.key, error=str(exc))
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** min(attempt, 16))
                await self._back_off(random.uniform(0, delay))
                continue
            self._mark_store(reachable=True)
            self.counters["uploaded"] += 1
            return stored, spooled

    def _rekeyed(self, spooled: SpooledObject, key: str) -> SpooledObject:
        """The object under `key`, its manifest entry (if it has one) naming it there."""
        if self._latest.get(spooled.key) == spooled.seq:
            del self._latest[spooled.key]
        self._latest[key] = spooled.seq
        extra = spooled.extra
        if spooled.listing is not None and extra is not None:
            entry = {**extra["entry"], "key": self.store.location(key)}
            extra = {**extra, "entry": entry}
        return replace(spooled, key=key, extra=extra)

    @contextlib.asynccontextmanager
    async def _reading(self, size: int) -> AsyncIterator[None]:
        """Hold `size` bytes of the upload read budget while an upload holds its body."""
        async with self._read_room:
            await self._read_room.wait_for(
                lambda: (
                    not size
                    or not self._reading_bytes
                    or self._reading_bytes + size <= self.upload_read_bytes
                )
            )
            self._reading_bytes += size
        try:
            yield
        finally:
            async with self._read_room:
                self._reading_bytes -= size
                self._read_room.notify_all()

    async def _put_in_fallback(
        self, fallback: ListingStore, spooled: SpooledObject, body: bytes
    ) -> StoredObject:
        """Store an object in the fallback. A document's version was the primary's, so it is
        merged with what the fallback holds and written over that instead."""
        if spooled.replaces is None:
            stored = await fallback.put(
                spooled.key,
                body,
                spooled.content_type,
                write_once=spooled.write_once,
                sha256=spooled.sha256,
            )
            if spooled.write_once:
                self.in_fallback.add(spooled.key)
            return stored
        for _ in range(_FALLBACK_MERGE_ATTEMPTS):
            fetched = await fallback.fetch(spooled.key)
            merged = body
            if fetched is not None and self.merge_documents is not None:
                merged = await asyncio.to_thread(
                    self.merge_documents, spooled.key, body, fetched[0]
                )
            try:
                return await fallback.put(
                    spooled.key,
                    merged,
                    spooled.content_type,
                    replaces="" if fetched is None else fetched[1],
                )
            except ObjectConflictError:
                continue
        raise StoreError(spooled.key, "the fallback's document kept changing")

    async def _bring_back(self) -> None:
        """Move what this process sent to the fallback back to the primary (raise
        `StoreError`): the document about to go there may list it."""
        assert self.fallback is not None
        for key in sorted(self.in_fallback):
            await move_write_once(self.fallback, self.store, key)
            self.in_fallback.discard(key)

    # The fallback store.

    def use_fallback(self, reason: str, pin: bool = False) -> bool:
        """Send every upload to the fallback store from now on (until the primary is seen
        reachable again, or for good with `pin`: a drain). False without a fallback."""
        if self.fallback is None:
            return False
        self._pinned_to_fallback |= pin
        if not self.using_fallback:
            self.using_fallback = True
            log.warning(
                "fallback_store_in_use",
                reason=reason,
                pending_bytes=self.pending_bytes,
                waiting=len(self._latest),
            )
            self._wake_waiting()
        return True

    async def evacuate(self, patience_s: float) -> int:
        """A drain past its deadline, with a fallback: send what the spool still holds
        unconfirmed, as it is on disk, straight to the fallback, for at most `patience_s`;
        how many objects went. Documents merge there as any upload to it does; a segment or
        batch arrives without the manifest entry it was waiting for (the manifest could not
        be written in time), which beats its loss with the task's disk. A second look takes
        what writes cut short by the stop put on disk during the first."""
        fallback = self.fallback
        if fallback is None:
            return 0
        loop = asyncio.get_running_loop()
        give_up = loop.time() + patience_s
        gate = asyncio.Semaphore(_EVACUATION_CONCURRENCY)
        moved = 0

        async def send(spooled: SpooledObject) -> None:
            nonlocal moved
            async with gate:
                body = await asyncio.to_thread(spooled.path.with_suffix(_DATA).read_bytes)
                await self._put_in_fallback(fallback, spooled, body)
                await self._forget(spooled)
                moved += 1

        for _ in range(2):
            records = await asyncio.to_thread(_scan, self.folder)
            waiting = [r for r in records if not r.uploaded and self._latest.get(r.key) == r.seq]
            if not waiting or loop.time() >= give_up:
                break
            sending = [asyncio.create_task(send(spooled)) for spooled in waiting]
            _, late = await asyncio.wait(sending, timeout=give_up - loop.time())
            for task in late:
                task.cancel()
            await asyncio.wait(sending)
            failed = [t for t in sending if not t.cancelled() and t.exception() is not None]
            if failed:
                log.error(
                    "evacuation_failed", objects=len(failed), error=str(failed[0].exception())
                )
        return moved

    def primary_reachable(self) -> None:
        """The primary answered (the reconciler's probe): uploads go there again."""
        self._mark_store(reachable=True)
        if self.using_fallback and not self._pinned_to_fallback:
            self.using_fallback = False
            log.warning("primary_store_in_use", pending_bytes=self.pending_bytes)
            self._wake_waiting()

    def _fallback_due(self) -> None:
        self._fallback_timer = None
        if not self.store_reachable:
            self.use_fallback(f"primary store unreachable for {self.fallback_after_s:g} s")

    @property
    def holds_only_copies(self) -> bool:
        """Whether the spool holds objects no store has confirmed, or records that are the
        only trace of stored objects no manifest lists yet."""
        return bool(self._latest) or self.pending_bytes > 0 or bool(self._unlisted)

    async def put(
        self,
        key: str,
        body: bytes,
        content_type: str,
        write_once: bool = False,
        replaces: str | None = None,
    ) -> StoredObject:
        """Write, then wait for the upload: `ObjectStore.put` with a durable outbox."""
        spooled = await self.write(
            key, body, content_type, write_once=write_once, replaces=replaces
        )
        return await self.confirm(spooled, body)

    async def fetch(self, key: str) -> tuple[bytes, str] | None:
        """What the store holds (never the spool's pending version), with its ETag."""
        return await self.store.fetch(key)

    def location(self, key: str) -> str:
        return self.store.location(key)

    async def get(self, key: str) -> bytes | None:
        """The newest version: still in the spool, or else from the store."""
        seq = self._latest.get(key)
        if seq is not None:
            name = f"{seq:020d}-{hashlib.sha256(key.encode()).hexdigest()[:16]}{_DATA}"
            try:
                return await asyncio.to_thread((self.folder / name).read_bytes)
            except FileNotFoundError:
                pass
        return await self.store.get(key)

    async def _release(self, spooled: SpooledObject) -> None:
        await asyncio.to_thread(_remove, spooled.path)
        async with self._room:
            self.pending_bytes -= spooled.size
            self._update_state()
            self._room.notify_all()

    # Start-up.

    async def leftovers(self, adopted: Collection[Path] = ()) -> list[SpooledObject]:
        """What a previous process left, oldest first: objects it spooled but never saw
        confirmed (their bytes count against the cap again), and records of uploaded objects
        (`uploaded`) that no confirmed manifest listed yet (they count nothing). Superseded
        versions of a key are dropped. `adopted`: other spool folders (their `objects/`)
        this process took over; their objects stay where they are until confirmed."""
        found: list[SpooledObject] = []
        for folder in [self.folder, *(SpoolFolders(Path(a)).objects for a in adopted)]:
            found.extend(await asyncio.to_thread(_scan, folder))
        found.sort(key=lambda s: s.seq)
        newest: dict[str, SpooledObject] = {}
        for spooled in found:
            older = newest.get(spooled.key)
            if older is not None:
                await asyncio.to_thread(_remove, older.path)
            newest[spooled.key] = spooled
        for spooled in [s for s in newest.values() if s.uploaded and s.listing is None]:
            await asyncio.to_thread(_remove, spooled.path)  # Nothing would list it.
            del newest[spooled.key]
        survivors = sorted(newest.values(), key=lambda s: s.seq)
        async with self._room:
            for spooled in survivors:
                listing = spooled.listing
                if spooled.uploaded and listing is not None:
                    self._unlisted.setdefault(listing[0], {})[listing[1]] = spooled
                    if spooled.in_fallback:
                        self.in_fallback.add(spooled.key)
                    continue
                self._latest[spooled.key] = spooled.seq
                self.pending_bytes += spooled.size
            self._update_state()
        return survivors

    def waiting_keys(self) -> list[str]:
        """Keys written to the spool and not yet confirmed by the store."""
        return sorted(self._latest)

    # State.

    @property
    def backpressure(self) -> bool:
        """Whether writers are waiting for room: the senders should be slowed, not shed."""
        return self._waiting_for_room > 0 or self.state is SpoolState.full

    def account_journal(self, delta_bytes: int) -> None:
        """Journals (the open segments' frames) live on the spool's disk: they count in
        its state, so a full disk slows the senders whatever fills it."""
        self.journal_bytes += delta_bytes
        self._update_state()

    async def wait_for_room_to_journal(self) -> None:
        """Wait, before journaling more frames, while uploads and journals together are
        past the cap and uploads are still to free room (journals alone never wait: they
        shrink only as their frames are segmented)."""
        if self.pending_bytes + self.journal_bytes < self.cap_bytes:
            return
        async with self._room:
            self.counters["waits_for_room"] += 1
            self._waiting_for_room += 1
            try:
                await self._room.wait_for(
                    lambda: (
                        self.pending_bytes + self.journal_bytes < self.cap_bytes
                        or self.pending_bytes == 0
                    )
                )
            finally:
                self._waiting_for_room -= 1

    def _update_state(self) -> None:
        used = self.pending_bytes + self.journal_bytes
        if used >= self.cap_bytes:
            state = SpoolState.full
        elif used >= self.high_water_bytes:
            state = SpoolState.high
        else:
            state = SpoolState.normal
        metrics.spool_pending(self.pending_bytes)
        if state is not self.state:
            log.warning(
                "spool_state_changed",
                state=state.value,
                previous=self.state.value,
                pending_bytes=self.pending_bytes,
                journal_bytes=self.journal_bytes,
                cap_bytes=self.cap_bytes,
            )
            self.state = state

    async def _back_off(self, delay_s: float) -> None:
        """Wait before the next try, or less: the first upload that gets through after an
        outage wakes every waiting one, so the backlog does not sit out its backoff."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await self._reachable_again.wait()

    def _wake_waiting(self) -> None:
        self._reachable_again.set()
        self._reachable_again = asyncio.Event()

    def _mark_store(self, reachable: bool, error: str = "") -> None:
        if reachable == self.store_reachable:
            return
        self.store_reachable = reachable
        metrics.store_reachable(reachable)
        if reachable:
            self.unreachable_since = None
            if self._fallback_timer is not None:
                self._fallback_timer.cancel()
                self._fallback_timer = None
            self._wake_waiting()
            log.warning("store_reachable_again", pending_bytes=self.pending_bytes)
        else:
            self.unreachable_since = time.monotonic()
            if self.fallback is not None and self._fallback_timer is None:
                self._fallback_timer = asyncio.get_running_loop().call_later(
                    self.fallback_after_s, self._fallback_due
                )
            log.error("store_unreachable", error=error, pending_bytes=self.pending_bytes)


def probe_folder(directory: str | os.PathLike[str]) -> None:
    """Check that the spool folder can be written, synced, read back and cleaned: write a
    probe file, fsync it, read it, remove it. Raise `ConfigError` naming the folder, its
    owner and mode, and the user this process runs as."""
    folder = Path(directory)
    probe = folder / f".probe-{os.getpid()}"
    body = os.urandom(16)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_durably(probe, body)
        if probe.read_bytes() != body:
            raise OSError(errno.EIO, "the probe file read back different bytes")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"the spool folder {folder.resolve()} cannot be used: {exc}. "
            f"{_describe_owner(folder)}; the service runs as {_describe_user()}. "
            "Give that user a writable folder (ARCHIVER_SPOOL_DIR) on a disk that outlives "
            "the process."
        ) from exc


def _describe_owner(folder: Path) -> str:
    for path in [folder, *folder.parents]:
        try:
            info = path.stat()
        except OSError:
            continue
        kind = "folder" if path.is_dir() else "file (not a folder)"
        where = "it" if path == folder else f"its nearest existing parent {path}"
        return (
            f"{where.capitalize()} is a {kind} owned by uid {info.st_uid} gid {info.st_gid}, "
            f"mode {stat.filemode(info.st_mode)} ({info.st_mode & 0o7777:o})"
        )
    return "No part of the path exists"


def _describe_user() -> str:
    uid, gid = os.getuid(), os.getgid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "(no name)"
    return f"uid {uid} ({name}) gid {gid}"


def _write_durably(path: Path, body: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        out.write(body)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def _meta(spooled: SpooledObject) -> bytes:
    return orjson.dumps(
        {
            "key": spooled.key,
            "content_type": spooled.content_type,
            "size": spooled.size,
            "sha256": spooled.sha256,
            "seq": spooled.seq,
            "write_once": spooled.write_once,
            "replaces": spooled.replaces,
            "extra": spooled.extra,
            "uploaded": spooled.uploaded,
            "in_fallback": spooled.in_fallback,
        }
    )


def _scan(folder: Path) -> list[SpooledObject]:
    if not folder.is_dir():
        return []
    found = []
    for meta_path in sorted(folder.glob(f"*{_META}")):
        try:
            meta = orjson.loads(meta_path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            log.warning("spool_entry_unreadable", file=meta_path.name)
            continue
        found.append(
            SpooledObject(
                key=meta["key"],
                content_type=meta["content_type"],
                size=meta["size"],
                sha256=meta["sha256"],
                seq=meta["seq"],
                path=meta_path.with_suffix(""),
                write_once=meta.get("write_once", False),
                replaces=meta.get("replaces"),
                extra=meta.get("extra"),
                uploaded=meta.get("uploaded", False),
                in_fallback=meta.get("in_fallback", False),
            )
        )
        if found[-1].uploaded:
            # Stopped between marking the record and removing the bytes.
            meta_path.with_suffix(_DATA).unlink(missing_ok=True)
    # Data files without metadata were never completely written: nothing refers to them;
    # nor to a file a crash caught before its rename.
    for data_path in folder.glob(f"*{_DATA}"):
        if not data_path.with_suffix(_META).exists():
            data_path.unlink(missing_ok=True)
    for tmp_path in folder.glob("*.tmp"):
        tmp_path.unlink(missing_ok=True)
    return found


def _mark_uploaded(record: SpooledObject) -> None:
    _write_durably(record.path.with_suffix(_META), _meta(record))
    record.path.with_suffix(_DATA).unlink(missing_ok=True)


def _remove(stem: Path) -> None:
    # NotADirectoryError: a write that failed because the folder is not one left nothing.
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        stem.with_suffix(_META).unlink()
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        stem.with_suffix(_DATA).unlink()


def _remove_all(stems: list[Path]) -> None:
    for stem in stems:
        _remove(stem)
