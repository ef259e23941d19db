"""The interface every store implements, and the value a successful write returns."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class StoredObject:
    """What the store confirmed it holds: its key in the bucket (prefix included), size and
    SHA-256 (hex)."""

    key: str
    size: int
    sha256: str
    etag: str = ""


class ObjectStore(Protocol):
    """Write-mostly object storage. Keys are relative to the store's own prefix."""

    async def put(
        self,
        key: str,
        body: bytes,
        content_type: str,
        write_once: bool = False,
        replaces: str | None = None,
        sha256: str | None = None,
    ) -> StoredObject:
        """Store `body` under `key` (same key, same bytes on retry); raise `StoreError`.
        With `write_once`, an existing object is never replaced: the same bytes count as
        stored, different bytes raise `ObjectConflictError`. With `replaces`, the write
        happens only over that version (an ETag; "" for no object yet), else
        `ObjectConflictError`: how two writers of one manifest notice each other. `sha256`
        (hex) is the body's digest where the caller has it already: a segment is hashed once,
        as it is written, not again on the event loop for every upload."""
        ...

    async def fetch(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None when there is none; raise `StoreError`."""
        ...

    def location(self, key: str) -> str:
        """The key as consumers find it in the bucket (with the store's prefix)."""
        ...

    async def get(self, key: str) -> bytes | None:
        """Return the object's bytes, or None when there is none; raise `StoreError`."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...


class ListingStore(ObjectStore, Protocol):
    """A store that can also be listed and emptied: what the fallback store must be."""

    async def list_keys(self, prefix: str) -> list[str]:
        """Every key under `prefix` (relative to the store's prefix), sorted; raise
        `StoreError`."""
        ...

    async def delete(self, key: str, if_match: str | None = None) -> bool:
        """Remove the object (only that version, with `if_match`: an ETag); True when it is
        gone, False when a newer version is there; raise `StoreError`."""
        ...


class ReadableStore(Protocol):
    """What consumers need of a store: whole objects, byte ranges, and listings. Keys are
    relative to the store's own prefix."""

    def location(self, key: str) -> str:
        """The key as consumers find it in the bucket (with the store's prefix)."""
        ...

    async def get(self, key: str) -> bytes | None:
        """Return the object's bytes, or None when there is none; raise `StoreError`."""
        ...

    async def get_range(self, key: str, offset: int, size: int) -> bytes | None:
        """Return `size` bytes of the object from `offset` (fewer at its end), or None when
        there is no object; raise `StoreError`."""
        ...

    async def list_keys(self, prefix: str) -> list[str]:
        """Every key under `prefix` (relative to the store's prefix), sorted."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...


def md5_hex(body: bytes) -> str:
    """The ETag S3 gives an object written in one PUT."""
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


def sha256_digest(body: bytes, known: str | None = None) -> tuple[str, str]:
    """Return the SHA-256 of `body` as (hex, base64): the manifest uses hex, S3 base64.
    `known` is its hex digest where already computed, so the body is not hashed again."""
    digest = bytes.fromhex(known) if known is not None else hashlib.sha256(body).digest()
    return digest.hex(), base64.b64encode(digest).decode("ascii")
