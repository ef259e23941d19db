"""Where archived objects go: an S3 bucket or a local folder, behind one small interface."""

from __future__ import annotations

from archiver.errors import ConfigError
from archiver.settings import Settings
from archiver.store.base import ObjectStore, StoredObject
from archiver.store.local import LocalFolderStore
from archiver.store.s3 import S3Store

__all__ = ["LocalFolderStore", "ObjectStore", "S3Store", "StoredObject", "open_store"]


def open_store(settings: Settings) -> ObjectStore:
    """Build the store that `settings.store` names; the one place that picks an implementation."""
    url = settings.store
    if url.startswith("file://"):
        return LocalFolderStore(url.removeprefix("file://"))
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ConfigError("ARCHIVER_STORE=s3://... needs a bucket name")
        return S3Store(
            bucket=bucket,
            prefix=prefix.strip("/"),
            endpoint_url=settings.s3_endpoint_url,
            attempts=settings.upload_attempts,
            concurrency=settings.upload_concurrency,
        )
    raise ConfigError(f"unknown store scheme in {url!r}")
