"""One contract for every store, and the spool's promises across a restart."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from archiver import logs
from archiver.errors import ObjectConflictError, StoreError
from archiver.store import LocalFolderStore, ObjectStore, S3Store
from archiver.store.base import StoredObject
from archiver.store.spool import Spool, SpoolState


@pytest.fixture(params=["local", "s3"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, s3_endpoint: str, bucket: str
) -> AsyncIterator[ObjectStore]:
    if request.param == "local":
        yield LocalFolderStore(tmp_path / "archive")
        return
    s3 = S3Store(bucket, "prefix", endpoint_url=s3_endpoint, attempts=2)
    yield s3
    await s3.close()


async def test_put_get_and_location(store: ObjectStore) -> None:
    stored = await store.put("a/b/c.json", b"{}", "application/json")
    assert stored.key == store.location("a/b/c.json")
    assert stored.sha256 == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    assert await store.get("a/b/c.json") == b"{}"
    assert await store.get("a/b/missing.json") is None
    await store.put("a/b/c.json", b"[1]", "application/json")
    assert await store.get("a/b/c.json") == b"[1]"


async def test_write_once_objects_are_never_replaced(store: ObjectStore) -> None:
    await store.put("seg/1.m4s", b"first", "video/iso.segment", write_once=True)
    again = await store.put("seg/1.m4s", b"first", "video/iso.segment", write_once=True)
    assert again.size == 5
    with pytest.raises(ObjectConflictError):
        await store.put("seg/1.m4s", b"second", "video/iso.segment", write_once=True)
    assert await store.get("seg/1.m4s") == b"first"


async def test_ranged_get_and_listing(store: ObjectStore) -> None:
    assert isinstance(store, LocalFolderStore | S3Store)
    await store.put("r/b/batch.tar", b"0123456789", "application/x-tar")
    await store.put("r/b/manifest.json", b"{}", "application/json")
    await store.put("r/c/other.json", b"{}", "application/json")
    assert await store.get_range("r/b/batch.tar", 3, 4) == b"3456"
    assert await store.get_range("r/b/batch.tar", 8, 10) == b"89"
    assert await store.get_range("r/b/missing.tar", 0, 4) is None
    assert await store.list_keys("r/b/") == ["r/b/batch.tar", "r/b/manifest.json"]
    assert await store.list_keys("r/") == ["r/b/batch.tar", "r/b/manifest.json", "r/c/other.json"]
    assert await store.list_keys("nothing/") == []


async def test_local_store_refuses_keys_outside_its_folder(tmp_path: Path) -> None:
    from archiver.errors import StoreError

    with pytest.raises(StoreError):
        await LocalFolderStore(tmp_path / "archive").put("../escape", b"x", "text/plain")


async def test_spool_leftovers_survive_a_restart_newest_version_only(tmp_path: Path) -> None:
    target = LocalFolderStore(tmp_path / "archive")
    first = Spool(tmp_path / "spool", target, cap_bytes=1024**2)
    await first.write("m/manifest.json", b"v1", "application/json")
    await first.write("m/manifest.json", b"v2", "application/json")
    await first.write("m/segments/1.m4s", b"media", "video/iso.segment", write_once=True)
    assert await first.get("m/manifest.json") == b"v2"
    assert await target.get("m/manifest.json") is None

    second = Spool(tmp_path / "spool", target, cap_bytes=1024**2)
    leftovers = await second.leftovers()
    assert [s.key for s in leftovers] == ["m/manifest.json", "m/segments/1.m4s"]
    assert second.pending_bytes == len(b"v2") + len(b"media")
    for spooled in leftovers:
        await second.confirm(spooled)
    assert await target.get("m/manifest.json") == b"v2"
    assert await target.get("m/segments/1.m4s") == b"media"
    assert second.pending_bytes == 0
    assert not list((tmp_path / "spool" / "objects").iterdir())


async def test_an_adopted_file_is_moved_in_and_survives_a_restart(tmp_path: Path) -> None:
    """A segment written through to disk as it was made is moved into the spool, not
    copied; from then on it is like any written object."""
    target = LocalFolderStore(tmp_path / "archive")
    made = tmp_path / "journal" / "0000000000000.mp4"
    made.parent.mkdir()
    made.write_bytes(b"media")
    first = Spool(tmp_path / "spool", target, cap_bytes=1024**2)
    digest = hashlib.sha256(b"media").hexdigest()
    spooled = await first.adopt("m/segments/1.m4s", made, 5, digest, "video/iso.segment")
    assert not made.exists()
    assert spooled.sha256 == digest
    assert first.pending_bytes == 5

    second = Spool(tmp_path / "spool", target, cap_bytes=1024**2)
    (leftover,) = await second.leftovers()
    assert (leftover.key, leftover.size, leftover.sha256) == ("m/segments/1.m4s", 5, digest)
    await second.confirm(leftover)
    assert await target.get("m/segments/1.m4s") == b"media"
    assert not list((tmp_path / "spool" / "objects").iterdir())


class _SlowStore(LocalFolderStore):
    """A real folder store whose writes take a while, counting the bytes they hold."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.holding = 0
        self.most = 0

    async def put(self, key: str, body: bytes, *args: Any, **kwargs: Any) -> StoredObject:
        self.holding += len(body)
        self.most = max(self.most, self.holding)
        try:
            await asyncio.sleep(0.05)
            return await super().put(key, body, *args, **kwargs)
        finally:
            self.holding -= len(body)


async def test_uploads_read_back_only_so_many_bytes_at_once(tmp_path: Path) -> None:
    """Segments that close together take turns to be read back for their upload; small
    documents are not held up by them."""
    store = _SlowStore(tmp_path / "archive")
    spool = Spool(tmp_path / "spool", store, cap_bytes=64 * 1024**2, upload_read_bytes=2_500_000)
    big = [await spool.write(f"s/{n}.m4s", bytes(1_000_000), "video/mp4") for n in range(6)]
    small = await spool.write("s/manifest.json", b"{}", "application/json")
    await asyncio.gather(*(spool.confirm(spooled) for spooled in [*big, small]))
    assert store.most <= 2_000_002
    assert [await store.get(f"s/{n}.m4s") for n in range(6)] == [bytes(1_000_000)] * 6


async def test_upload_stopped_by_shutdown_stays_in_the_spool(tmp_path: Path) -> None:
    unreachable = S3Store("bucket", endpoint_url="http://127.0.0.1:9", attempts=1)
    spool = Spool(tmp_path / "spool", unreachable, cap_bytes=1024**2, backoff_s=0.01)
    spooled = await spool.write("m/segments/1.m4s", b"media", "video/iso.segment")
    uploading = asyncio.create_task(spool.confirm(spooled))
    async with asyncio.timeout(20):
        while spool.store_reachable:  # noqa: ASYNC110 (a flag the spool does not signal)
            await asyncio.sleep(0.05)
    assert spool.counters["upload_retries"] >= 1
    assert not uploading.done()
    uploading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await uploading
    await unreachable.close()
    successor = Spool(tmp_path / "spool", LocalFolderStore(tmp_path / "archive"), 1024**2)
    assert [s.key for s in await successor.leftovers()] == ["m/segments/1.m4s"]


async def test_listing_and_conditional_delete(store: ObjectStore) -> None:
    """What the fallback store needs beyond `ObjectStore`."""
    assert isinstance(store, LocalFolderStore | S3Store)
    first = await store.put("a/manifest.json", b"{}", "application/json")
    await store.put("a/segments/1.m4s", b"media", "video/iso.segment", write_once=True)
    assert sorted(await store.list_keys("")) == ["a/manifest.json", "a/segments/1.m4s"]
    await store.put("a/manifest.json", b'{"newer": 1}', "application/json")
    # A newer version than the one read is kept.
    assert not await store.delete("a/manifest.json", if_match=first.etag)
    assert await store.delete("a/manifest.json")
    assert await store.delete("a/segments/1.m4s")
    assert await store.delete("never/there.m4s")
    assert await store.list_keys("") == []


async def test_spool_write_failure_is_counted_and_logged_once_per_cause(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The service's own log lines, as an operator reads them: independent of whichever
    # structlog configuration an earlier test in this process left its loggers bound to.
    logs.configure("info", "json")
    spool = Spool(tmp_path / "spool", LocalFolderStore(tmp_path / "archive"), 1024**2)
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "objects").write_text("a file where the folder should be")
    for _ in range(3):
        with pytest.raises(StoreError):
            await spool.write("m/segments/1.m4s", b"media", "video/iso.segment")
    assert not spool.writable
    assert spool.counters["spool_write_failures"] == 3
    assert spool.pending_bytes == 0
    out = capsys.readouterr().out
    logged = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
    failures = [line for line in logged if line["event"] == "spool_write_failed"]
    assert len(failures) == 1
    assert failures[0]["level"] == "error"
    (tmp_path / "spool" / "objects").unlink()
    await spool.write("m/segments/1.m4s", b"media", "video/iso.segment")
    assert spool.writable


async def test_uploads_go_to_the_fallback_once_the_primary_was_down_long_enough(
    tmp_path: Path,
) -> None:
    unreachable = S3Store("bucket", endpoint_url="http://127.0.0.1:9", attempts=1)
    fallback = LocalFolderStore(tmp_path / "fallback")
    spool = Spool(
        tmp_path / "spool",
        unreachable,
        cap_bytes=1024**2,
        backoff_s=0.01,
        fallback=fallback,
        fallback_after_s=0.2,
    )
    spooled = await spool.write("m/segments/1.m4s", b"media", "video/iso.segment", write_once=True)
    async with asyncio.timeout(20):
        await spool.confirm(spooled)
    assert spool.using_fallback
    assert await fallback.get("m/segments/1.m4s") == b"media"
    assert spool.in_fallback == {"m/segments/1.m4s"}
    assert spool.pending_bytes == 0
    assert list((tmp_path / "spool" / "objects").iterdir()) == []
    await unreachable.close()


async def test_journals_count_in_the_spool_and_wait_only_while_uploads_can_free_room(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool", LocalFolderStore(tmp_path / "archive"), cap_bytes=1024**2)
    spool.account_journal(1024**2)
    assert spool.state is SpoolState.full
    # Journals alone never wait: they shrink only as their frames are segmented.
    await asyncio.wait_for(spool.wait_for_room_to_journal(), 1)

    spooled = await spool.write("a/segments/1.m4s", b"x" * 1024, "video/iso.segment")
    waiting = asyncio.create_task(spool.wait_for_room_to_journal())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert spool.backpressure
    spool.account_journal(-(1024**2))
    await spool.confirm(spooled)
    await asyncio.wait_for(waiting, 1)
    assert spool.state is SpoolState.normal
