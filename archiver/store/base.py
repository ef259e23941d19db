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


class ObjectStore(Protocol):
    """Write-mostly object storage. Keys are relative to the store's own prefix."""

    async def put(self, key: str, body: bytes, content_type: str) -> StoredObject:
        """Store `body` under `key` (same key, same bytes on retry); raise `StoreError`."""
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


def sha256_digest(body: bytes) -> tuple[str, str]:
    """Return the SHA-256 of `body` as (hex, base64): the manifest uses hex, S3 base64."""
    digest = hashlib.sha256(body).digest()
    return digest.hex(), base64.b64encode(digest).decode("ascii")
