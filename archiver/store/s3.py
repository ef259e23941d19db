"""The S3 store: the only module that knows boto3. Its calls run on a thread pool."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import botocore.exceptions

from archiver.errors import ObjectConflictError, StoreError
from archiver.store.base import StoredObject, md5_hex, sha256_digest

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class _AlreadyThere(Exception):
    """A conditional write found the key taken."""


class S3Store:
    """Objects under `s3://bucket/prefix/`; every PUT carries its SHA-256 for S3 to verify.

    Retries use botocore's standard mode: exponential backoff with jitter, on throttling,
    5xx answers and connection errors alike.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        attempts: int = 6,
        concurrency: int = 8,
    ) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": attempts},
            max_pool_connections=concurrency,
            connect_timeout=5,
            read_timeout=30,
            # Requests are signed with SigV4 anyway; this makes presigned URLs SigV4 too
            # (botocore's default for them is still SigV2, which new regions refuse).
            signature_version="s3v4",
        )
        self._client: S3Client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, config=config
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3")

    async def _call(self, key: str, fn: Any, /, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, partial(fn, **kwargs))
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _NOT_FOUND:
                raise FileNotFoundError(key) from exc
            if code in _DENIED and fn == self._read_object:
                raise PermissionError(key) from exc
            if code in _PRECONDITION or (code in _NOT_FOUND and "IfMatch" in kwargs):
                raise _AlreadyThere(key) from exc
            raise StoreError(self.prefix + key, f"S3 refused: {code or exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StoreError(self.prefix + key, f"S3 unreachable: {exc}") from exc

    def location(self, key: str) -> str:
        return self.prefix + key

    async def put(
        self,
        key: str,
        body: bytes,
        content_type: str,
        write_once: bool = False,
        replaces: str | None = None,
        sha256: str | None = None,
    ) -> StoredObject:
        sha_hex, sha_b64 = sha256_digest(body, sha256)
        conditions: dict[str, str] = {}
        if write_once or replaces == "":
            conditions["IfNoneMatch"] = "*"
        elif replaces is not None:
            conditions["IfMatch"] = replaces
        try:
            response = await self._call(
                key,
                self._client.put_object,
                Bucket=self.bucket,
                Key=self.prefix + key,
                Body=body,
                ContentType=content_type,
                ChecksumSHA256=sha_b64,
                **conditions,
            )
        except _AlreadyThere:
            if replaces is not None:
                raise ObjectConflictError(
                    self.location(key), "the object changed since it was read"
                ) from None
            # A retry of a write that did land, or another writer: compare, never replace.
            head = await self._call(
                key, self._client.head_object, Bucket=self.bucket, Key=self.prefix + key
            )
            if head.get("ETag", "").strip('"') != md5_hex(body):
                raise ObjectConflictError(
                    self.location(key), "a different object is stored"
                ) from None
            response = head
        etag = str(response.get("ETag", "")).strip('"')
        return StoredObject(self.location(key), len(body), sha_hex, etag)

    async def get(self, key: str) -> bytes | None:
        fetched = await self.fetch(key)
        return None if fetched is None else fetched[0]

    async def fetch(self, key: str) -> tuple[bytes, str] | None:
        return await self._get_object(key)

    async def get_range(self, key: str, offset: int, size: int) -> bytes | None:
        if size <= 0:
            return b""
        fetched = await self._get_object(key, Range=f"bytes={offset}-{offset + size - 1}")
        return None if fetched is None else fetched[0]

    async def _get_object(self, key: str, **extra: str) -> tuple[bytes, str] | None:
        """The object's bytes (or the range asked for) and ETag; None when there is none."""
        try:
            read: tuple[bytes, str] = await self._call(
                key, self._read_object, Bucket=self.bucket, Key=self.prefix + key, **extra
            )
        except FileNotFoundError:
            return None
        except PermissionError:
            # Without bucket-wide s3:ListBucket, S3 answers 403 for a missing key: a listing
            # of exactly that key, which the prefix-scoped permission allows, tells apart.
            if await self._absent(key):
                return None
            raise StoreError(self.prefix + key, "S3 refused: AccessDenied") from None
        return read

    def _read_object(self, **request: Any) -> tuple[bytes, str]:
        """GET and read the body in one job of the pool: a response read later would hold
        its connection while other jobs open more than the pool keeps (urllib3 then
        discards them, with a warning each)."""
        response = self._client.get_object(**request)
        return response["Body"].read(), str(response.get("ETag", "")).strip('"')

    def presigned_get_url(self, key: str, expires_s: int) -> str:
        """A URL that GETs the object (whole, or a `Range`) without credentials until it
        expires; signed locally, no request to S3."""
        url: str = self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.prefix + key},
            ExpiresIn=expires_s,
        )
        return url

    async def list_keys(self, prefix: str) -> list[str]:
        def list_all() -> list[str]:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            return [
                obj["Key"].removeprefix(self.prefix)
                for page in pages
                for obj in page.get("Contents", [])
            ]

        keys: list[str] = await self._call(prefix, list_all)
        return sorted(keys)

    async def _absent(self, key: str) -> bool:
        listing = await self._call(
            key,
            self._client.list_objects_v2,
            Bucket=self.bucket,
            Prefix=self.prefix + key,
            MaxKeys=1,
        )
        return not any(obj["Key"] == self.prefix + key for obj in listing.get("Contents", []))

    async def delete(self, key: str, if_match: str | None = None) -> bool:
        if if_match is not None:
            # Read the version again just before: S3's conditional delete is recent and
            # not everywhere (S3-compatible servers), so it is checked here as well.
            fetched = await self.fetch(key)
            if fetched is None:
                return True
            if fetched[1] != if_match:
                return False
        with contextlib.suppress(FileNotFoundError):
            await self._call(
                key, self._client.delete_object, Bucket=self.bucket, Key=self.prefix + key
            )
        return True

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
