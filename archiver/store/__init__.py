"""Where archived objects go: an S3 bucket or a local folder, behind one small interface."""

from __future__ import annotations

from archiver.errors import ConfigError
from archiver.settings import Settings
from archiver.store.base import ObjectStore, ReadableStore, StoredObject
from archiver.store.local import LocalFolderStore
from archiver.store.s3 import S3Store

__all__ = [
    "LocalFolderStore",
    "ObjectStore",
    "ReadableStore",
    "S3Store",
    "StoredObject",
    "open_store",
    "store_from_url",
]


def open_store(settings: Settings) -> ObjectStore:
    """Build the store that `settings.store` names; the one place that picks an implementation."""
    return store_from_url(
        settings.store,
        settings.s3_endpoint_url,
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
            raise ConfigError("an s3:// store URL needs a bucket name")
        return S3Store(
            bucket=bucket,
            prefix=prefix.strip("/"),
            endpoint_url=endpoint_url,
            attempts=attempts,
            concurrency=concurrency,
        )
    raise ConfigError(f"unknown store scheme in {url!r}")
