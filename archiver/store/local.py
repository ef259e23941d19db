"""A local folder laid out exactly like the S3 bucket, so the service runs with no cloud."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from archiver.errors import ObjectConflictError, StoreError
from archiver.store.base import StoredObject, md5_hex, sha256_digest


class LocalFolderStore:
    """Each key is a file under `root`; writes are atomic (temp file, fsync, rename)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise StoreError(key, "key leaves the store's folder")
        return path

    def location(self, key: str) -> str:
        return key

    async def put(
        self,
        key: str,
        body: bytes,
        content_type: str,
        write_once: bool = False,
        replaces: str | None = None,
        sha256: str | None = None,
    ) -> StoredObject:
        """ETags are the MD5 of the content, as S3's are for single-part objects. A
        write-once object is created exclusively (several processes may share the folder);
        `replaces` is checked, not locked."""
        path = self._path(key)
        stored = StoredObject(key, len(body), sha256_digest(body, sha256)[0], md5_hex(body))
        if write_once and replaces is None:
            if await asyncio.to_thread(self._write, path, body, key, True):
                return stored
            existing = await self.get(key)
            if existing != body:
                raise ObjectConflictError(key, "a different object is stored there")
            return stored
        if write_once or replaces is not None:
            existing = await self.get(key)
            current = "" if existing is None else md5_hex(existing)
            if replaces is not None and current != replaces:
                raise ObjectConflictError(key, "the object changed since it was read")
            if write_once and existing is not None:
                if existing != body:
                    raise ObjectConflictError(key, "a different object is stored there")
                return stored
        await asyncio.to_thread(self._write, path, body, key)
        return stored

    async def fetch(self, key: str) -> tuple[bytes, str] | None:
        body = await self.get(key)
        return None if body is None else (body, md5_hex(body))

    @staticmethod
    def _write(path: Path, body: bytes, key: str, exclusive: bool = False) -> bool:
        """Write whole or not at all; `exclusive`: only where nothing is, by a hard link
        (an `open(..., "x")` that no reader can see half-written). Return whether written."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(body)
                    out.flush()
                    os.fsync(out.fileno())
                if not exclusive:
                    os.replace(tmp, path)
                    return True
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                return True
            finally:
                Path(tmp).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(key, str(exc)) from exc

    async def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(key, str(exc)) from exc

    async def delete(self, key: str, if_match: str | None = None) -> bool:
        path = self._path(key)
        if if_match is not None:
            body = await self.get(key)
            if body is None:
                return True
            if md5_hex(body) != if_match:
                return False
        try:
            await asyncio.to_thread(path.unlink, True)
        except OSError as exc:
            raise StoreError(key, str(exc)) from exc
        return True

    async def get_range(self, key: str, offset: int, size: int) -> bytes | None:
        path = self._path(key)

        def read() -> bytes:
            with path.open("rb") as file:
                file.seek(offset)
                return file.read(size)

        try:
            return await asyncio.to_thread(read)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(key, str(exc)) from exc

    async def list_keys(self, prefix: str) -> list[str]:
        """Files under the folder `prefix` names (partly written ones left out)."""
        folder = prefix.rpartition("/")[0]
        top = self._path(folder) if folder else self.root

        def walk() -> list[str]:
            keys = []
            for path in top.rglob("*"):
                if path.is_file() and not path.name.startswith(".part-"):
                    key = path.relative_to(self.root).as_posix()
                    if key.startswith(prefix):
                        keys.append(key)
            return sorted(keys)

        if not top.is_dir():
            return []
        try:
            return await asyncio.to_thread(walk)
        except OSError as exc:
            raise StoreError(prefix, str(exc)) from exc

    async def close(self) -> None:
        return None
