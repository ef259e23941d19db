"""The reader API: the right frames for a time range, fetched from only what they need,
also in a stream continued mid-GOP on another task."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

import orjson
import pytest

from archiver.layout import RecordingId
from archiver.reader import Archive
from archiver.store import LocalFolderStore
from tests.consumers.conftest import Continue, Simulate, picture_md5, sent_pictures


class CountingStore(LocalFolderStore):
    """Records what is fetched, whole or by range."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.gets: list[str] = []
        self.ranges: list[tuple[str, int, int]] = []

    async def get(self, key: str) -> bytes | None:
        self.gets.append(key)
        return await super().get(key)

    async def get_range(self, key: str, offset: int, size: int) -> bytes | None:
        self.ranges.append((key, offset, size))
        return await super().get_range(key, offset, size)


async def test_h264_frames_of_a_time_range(local_archive: Simulate) -> None:
    archived = await local_archive(
        participants=2, seconds=4, fps=10, resize_at_s=2.0, start_relative_s=10.0
    )
    store = CountingStore(archived.store_url.removeprefix("file://"))
    archive = Archive(store)
    recording = RecordingId(archived.bot_id, archived.recording_id)
    assert await archive.recordings() == [recording]
    streams = await archive.streams(recording)
    assert [(s.participant_id, s.type, s.format) for s in streams] == [
        ("100", "webcam", "h264"),
        ("101", "webcam", "h264"),
    ]
    stream = streams[1]
    manifest = await archive.manifest(stream)
    segments = manifest["segments"]

    store.gets.clear()
    frames = [frame async for frame in archive.frames(stream, 11.3, 12.45)]
    sent = [f for f in archived.simulations[0].streams[1].sent if 11.3 <= f.relative_s < 12.45]
    assert [f.relative_s for f in frames] == pytest.approx([f.relative_s for f in sent], abs=1e-6)
    assert [(f.width, f.height) for f in frames] == [(f.width, f.height) for f in sent]
    assert frames[-1].width == 480  # across the resolution change at 12 s
    for frame in frames:
        segment = next(s for s in segments if s["start"] <= frame.relative_s < s["end"])
        start = datetime.fromisoformat(segment["start_wallclock"])
        assert frame.absolute == start + timedelta(seconds=frame.relative_s - segment["start"])
    array = frames[0].to_ndarray()
    assert array.shape == (240, 320, 3)

    # Only the segments holding the range, and those back to the key frame they need: the
    # segments from 10.0 s (key frame) to 12.5 s, not the last one.
    fetched = {key for key in store.gets if key.endswith(".m4s")}
    needed = {
        archive.relative(s["key"]) for s in segments if s["start"] < 12.45 and s["end"] > 10.0
    }
    assert fetched == needed
    assert len(needed) < len(segments)

    everything = [frame async for frame in archive.frames(stream)]
    assert len(everything) == 40


async def test_png_frames_by_ranged_reads(local_archive: Simulate) -> None:
    archived = await local_archive(participants=1, seconds=6, format="png", fps=2)
    store = CountingStore(archived.store_url.removeprefix("file://"))
    async with Archive(store) as archive:
        [stream] = await archive.streams(RecordingId(archived.bot_id, archived.recording_id))
        store.gets.clear()
        frames = [frame async for frame in archive.frames(stream, 1.0, 3.0)]
        sent = [f for f in archived.simulations[0].streams[0].sent if 1.0 <= f.relative_s < 3.0]
        assert [f.relative_s for f in frames] == [f.relative_s for f in sent] == [1, 1.5, 2, 2.5]
        assert [hashlib.sha256(f.png or b"").hexdigest() for f in frames] == [
            f.sha256 for f in sent
        ]
        assert frames[0].to_ndarray().shape == (240, 320, 3)
        assert [key for key in store.gets if key.endswith(".tar")] == []
        manifest = orjson.loads(await store.get(stream.manifest_key) or b"{}")
        [batch] = manifest["batches"]
        listed = [f for f in batch["frames"] if 1.0 <= f["relative"] < 3.0]
        first, last = listed[0], listed[-1]
        assert store.ranges == [
            (
                archive.relative(batch["key"]),
                first["offset"],
                last["offset"] + last["size"] - first["offset"],
            )
        ]
        assert frames[0].absolute == datetime.fromisoformat(listed[0]["absolute"])


async def test_frames_of_a_range_inside_a_stream_continued_mid_gop(
    continued_local: Continue,
) -> None:
    """The range starts after a reconnect to another task, inside a segment without a key
    frame: decoding walks back to the stream's key frame, and yields just the range."""
    archived = await continued_local()
    store = CountingStore(archived.store_url.removeprefix("file://"))
    async with Archive(store) as archive:
        [stream] = await archive.streams(RecordingId(archived.bot_id, archived.recording_id))
        segments = (await archive.manifest(stream))["segments"]
        assert segments[0]["start"] < archived.reconnect_s < 2.55
        store.gets.clear()
        frames = [frame async for frame in archive.frames(stream, 2.55, 3.45)]
        expected = [(t, md5) for t, md5 in sent_pictures(archived.units) if 2.55 <= t < 3.45]
        assert [(f.relative_s, picture_md5(f.image)) for f in frames] == expected
        assert [f.relative_s for f in frames] == pytest.approx([2.6 + n / 10 for n in range(9)])
        fetched = [key for key in store.gets if key.endswith(".m4s")]
        assert fetched == [archive.relative(s["key"]) for s in segments if s["start"] < 3.45]


async def test_frames_after_frames_never_received(continued_local: Continue) -> None:
    # 3 s the bot was away: the frames after it still decode, from the key frame before.
    archived = await continued_local(seconds=6, then=(50, 60))
    async with Archive.open(archived.store_url) as archive:
        [stream] = await archive.streams(RecordingId(archived.bot_id, archived.recording_id))
        frames = [frame async for frame in archive.frames(stream, 5.25, 5.75)]
        assert [f.relative_s for f in frames] == pytest.approx([5.3, 5.4, 5.5, 5.6, 5.7])
        assert {(f.width, f.height) for f in frames} == {(320, 240)}
