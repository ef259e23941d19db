"""Moving an object from one store to another: the fallback's way back to the primary."""

from __future__ import annotations

import structlog

from archiver.errors import StoreError
from archiver.store.base import ListingStore, ObjectStore, sha256_digest

log = structlog.get_logger(__name__)

_CONTENT_TYPES = {
    ".mp4": "video/mp4",
    ".m4s": "video/iso.segment",
    ".tar": "application/x-tar",
    ".jsonl": "application/x-ndjson",
    ".json": "application/json",
}


def content_type_for(key: str) -> str:
    """The content type the service gave an object, from its key's suffix."""
    suffix = key[key.rfind(".") :] if "." in key.rsplit("/", 1)[-1] else ""
    return _CONTENT_TYPES.get(suffix, "application/octet-stream")


async def move_write_once(source: ListingStore, target: ObjectStore, key: str) -> int | None:
    """Copy a write-once object to `target` (never over different bytes), check that the
    target holds the same SHA-256, then delete it from `source`; return its size. None when
    `source` no longer holds it (another mover was first: it deletes only after the target
    confirmed). Raise `StoreError` (`ObjectConflictError` when the target holds different bytes: the
    object then stays in `source` for a person to look at)."""
    body = await source.get(key)
    if body is None:
        return None
    sha256 = sha256_digest(body)[0]
    # S3 checks the body against its SHA-256 on the way in; an object that was already there
    # (another mover, a retry) is compared by its bytes.
    stored = await target.put(key, body, content_type_for(key), write_once=True)
    if stored.sha256 != sha256:
        raise StoreError(key, "the moved object's SHA-256 does not match")
    await source.delete(key)
    return len(body)
