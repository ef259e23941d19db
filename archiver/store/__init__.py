"""Where archived objects go: an S3 bucket or a local folder, behind one small interface."""

from __future__ import annotations

from archiver.errors import ConfigError
from archiver.settings import Settings
from archiver.store.base import ListingStore, ObjectStore, ReadableStore, StoredObject
from archiver.store.local import LocalFolderStore
from archiver.store.s3 import S3Store

__all__ = [
    "ListingStore",
    "LocalFolderStore",
    "ObjectStore",
    "ReadableStore",
    "S3Store",
    "StoredObject",
    "open_fallback_store",
    "open_store",
    "store_from_url",
]


def open_store(settings: Settings) -> ObjectStore:
    """Build the store that `settings.store` names; the one place that picks an implementation."""
    return _open(settings.store, settings.s3_endpoint_url, settings)


def open_fallback_store(settings: Settings) -> ListingStore | None:
    """The fallback store `settings.fallback_store` names, or None when there is none."""
    if settings.fallback_store is None:
        return None
    return _open(settings.fallback_store, settings.fallback_s3_endpoint_url, settings)


def _open(url: str, endpoint_url: str | None, settings: Settings) -> LocalFolderStore | S3Store:
    return store_from_url(
        url,
        endpoint_url,
        attempts=settings.upload_attempts,
        concurrency=settings.upload_concurrency,
    )


def store_from_url(
    url: str, endpoint_url: str | None = None, attempts: int = 6, concurrency: int = 8
) -> S3Store | LocalFolderStore:
    """The store at `s3://bucket/prefix` (on `endpoint_url`, else AWS) or `file:///path`."""
    if url.startswith("file://"):
        return LocalFolderStore(url.removeprefix("file://"))
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ConfigError(f"{url!r} needs a bucket name (s3://bucket/prefix)")
        return S3Store(
            bucket=bucket,
            prefix=prefix.strip("/"),
            endpoint_url=endpoint_url,
            attempts=attempts,
            concurrency=concurrency,
        )
    raise ConfigError(f"unknown store scheme in {url!r}")
