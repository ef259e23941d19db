"""End to end: PNG frames into tar batches in S3, read back whole, by member, and by range."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import struct
import tarfile
import zlib
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import aiohttp
import jsonschema
import orjson
import pytest

from archiver.consumers.decode_check import PngStreamCheck, check_png_stream
from archiver.documents.merging import stream_header
from archiver.errors import MediaError
from archiver.layout import RecordingId, SpoolFolders, StreamId
from archiver.segmenting.png import PngBatcher, read_header
from archiver.store.journal import StreamJournal
from archiver.tools.simulator import (
    SimulatedStream,
    Simulation,
    encode_png_stream,
    media_message,
    run_simulation,
)
from archiver.values import RecordingContext
from tests.conftest import RunningService, ServiceFactory

PNG_EVENT = "video_separate_png.data"


def manifest_key(sim: Simulation, participant_id: int, video_type: str = "webcam") -> str:
    return (
        f"{sim.bot_id}/{sim.recording_id}/participants/{participant_id}/{video_type}/png"
        "/manifest.json"
    )


async def archive_of(running: RunningService, key: str) -> PngStreamCheck:
    check = await check_png_stream(running.store, key, key_prefix="archive/")
    assert check.ok, check.problems
    return check


def validate(manifest: dict) -> None:
    text = resources.files("archiver").joinpath("schema/png-manifest.schema.json").read_text()
    jsonschema.validate(manifest, json.loads(text), format_checker=jsonschema.FormatChecker())


def pngs(count: int, size: tuple[int, int] = (160, 90)) -> list[bytes]:
    plan = SimulatedStream(100, "webcam", [(0.0, size)], "png")
    return [data for _, data, _ in encode_png_stream(plan, count / 2, 2.0)]


class PngBot:
    """Sends PNG buffers of one participant's webcam, with the timestamps a test chooses."""

    def __init__(self, running: RunningService) -> None:
        self.sim = Simulation(url=running.url, participants=1, format="png")
        self.start = datetime.now(UTC)
        self.ids = {"bot_id": self.sim.bot_id, "recording_id": self.sim.recording_id}
        self.manifest_key = manifest_key(self.sim, 100)

    def message(self, data: bytes, relative_s: float) -> str:
        message = media_message(
            data, relative_s, self.start, "webcam", 100, event=PNG_EVENT, **self.ids
        )
        return orjson.dumps(message).decode()

    async def send(self, running: RunningService, frames: list[tuple[float, bytes]]) -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
            for relative_s, data in frames:
                await ws.send_str(self.message(data, relative_s))


async def test_every_png_is_archived_byte_identical_in_time_order_with_its_timestamps(
    service: ServiceFactory, s3, tmp_path: Path
) -> None:
    running = await service(png_batch_frames=4)
    sim = await run_simulation(
        Simulation(
            url=running.url,
            participants=2,
            seconds=4,
            fps=2,
            size=(320, 180),
            format="png",
            start_relative_s=3.25,
            screenshare=True,
        )
    )
    await running.settle()
    for stream in sim.streams:
        check = await archive_of(
            running, manifest_key(sim, stream.participant_id, stream.video_type)
        )
        assert len(stream.sent) == 8
        assert [hashlib.sha256(f.data).hexdigest() for f in check.frames] == [
            f.sha256 for f in stream.sent
        ]
        assert [f.relative_s for f in check.frames] == [f.relative_s for f in stream.sent]
        assert {(f.width, f.height) for f in check.frames} == {(320, 180)}
        manifest = check.manifest
        validate(manifest)
        assert manifest["status"] == "complete"
        assert manifest["format"] == "png"
        assert manifest["type"] == stream.video_type
        assert manifest["frames"] == 8
        assert manifest["counters"]["archived"] == 8
        assert manifest["counters"]["batches"] == 2
        assert manifest["bot"]["metadata"] == {"team": "sales"}
        assert manifest["participant"]["name"] == f"Participant {stream.participant_id}"
        batches = manifest["batches"]
        assert [b["seq"] for b in batches] == [0, 1]
        assert [b["start"] for b in batches] == [3.25, 5.25]
        assert [b["end"] for b in batches] == [4.75, 6.75]
        assert batches[0]["key"].endswith("/png/batches/0000003250000.tar")
        first = batches[0]["frames"][1]
        assert first["name"] == "000003.750000.png"
        assert first["relative"] == 3.75
        assert datetime.fromisoformat(first["absolute"]) > datetime(2020, 1, 1, tzinfo=UTC)
    session = await running.json(f"{sim.bot_id}/{sim.recording_id}/session.json")
    assert {(s["type"], s["format"]) for s in session["streams"]} == {
        ("webcam", "png"),
        ("screenshare", "png"),
    }

    # The batches are plain tars: tarfile and tar(1) both extract the PNGs, named by time.
    batch_key = (await running.json(manifest_key(sim, 100)))["batches"][0]["key"]
    tar_path = tmp_path / "batch.tar"
    tar_path.write_bytes(s3.get_object(Bucket=running.bucket, Key=batch_key)["Body"].read())
    with tarfile.open(tar_path) as tar:
        tar.extractall(tmp_path / "tarfile", filter="data")
    names = sorted(p.name for p in (tmp_path / "tarfile").iterdir())
    assert names == [
        "000003.250000.png",
        "000003.750000.png",
        "000004.250000.png",
        "000004.750000.png",
    ]
    extracted = (tmp_path / "tarfile" / names[0]).read_bytes()
    assert hashlib.sha256(extracted).hexdigest() == sim.streams[0].sent[0].sha256
    if shutil.which("tar"):
        (tmp_path / "tar").mkdir()
        untar = await asyncio.create_subprocess_exec(
            "tar", "-xf", str(tar_path), "-C", str(tmp_path / "tar")
        )
        assert await untar.wait() == 0
        assert sorted(p.name for p in (tmp_path / "tar").iterdir()) == names


async def test_a_ranged_get_at_the_listed_offset_returns_exactly_one_frame(
    service: ServiceFactory, s3
) -> None:
    running = await service()
    bot = PngBot(running)
    images = pngs(3)
    await bot.send(running, [(0.5 * n, data) for n, data in enumerate(images)])
    await running.settle()
    manifest = await running.json(bot.manifest_key)
    (batch,) = manifest["batches"]
    for frame, image in zip(batch["frames"], images, strict=True):
        last = frame["offset"] + frame["size"] - 1
        got = s3.get_object(
            Bucket=running.bucket, Key=batch["key"], Range=f"bytes={frame['offset']}-{last}"
        )["Body"].read()
        assert got == image


async def test_batches_close_on_count_on_time_and_at_stream_end(
    service: ServiceFactory,
) -> None:
    running = await service(png_batch_frames=4, png_batch_s=3.0)
    bot = PngBot(running)
    images = pngs(9)
    times = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 6.0, 6.5, 6.5]
    await bot.send(running, list(zip(times, images, strict=True)))
    await running.settle()
    check = await archive_of(running, bot.manifest_key)
    batches = check.manifest["batches"]
    assert [[f["relative"] for f in b["frames"]] for b in batches] == [
        [0.0, 0.5, 1.0, 1.5],  # four frames: the count closes it
        [2.0, 2.5],  # the next frame is 3 s or more after 2.0: time closes it
        [6.0, 6.5, 6.500001],  # stream end; a repeated timestamp moves on by 1 µs
    ]
    assert [b["frame_count"] for b in batches] == [4, 2, 3]
    assert batches[2]["frames"][2]["name"] == "000006.500001.png"
    assert check.manifest["counters"]["timestamps_adjusted"] == 1
    assert [f.data for f in check.frames] == images


async def test_a_buffer_that_is_not_a_png_is_counted_and_skipped_and_the_stream_goes_on(
    service: ServiceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    running = await service()
    bot = PngBot(running)
    images = pngs(4)
    broken_crc = bytearray(images[0])
    broken_crc[16] ^= 0xFF  # width inside IHDR, so its CRC no longer matches
    not_png = base64.b64encode(b"GIF89a" + b"\x00" * 64).decode()
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        await ws.send_str(bot.message(images[0], 0.0))
        await ws.send_str(bot.message(images[1], 0.5))
        gif = orjson.loads(bot.message(images[1], 0.7))
        gif["data"]["data"]["buffer"] = not_png
        await ws.send_str(orjson.dumps(gif).decode())
        await ws.send_str(bot.message(bytes(broken_crc), 0.8))
        await ws.send_str(bot.message(images[0][:20], 0.9))
        await ws.send_str(bot.message(images[2], 1.0))
        await ws.send_str(bot.message(images[3], 1.5))
        assert not ws.closed
    await running.settle()
    check = await archive_of(running, bot.manifest_key)
    assert [f.data for f in check.frames] == images
    counters = check.manifest["counters"]
    assert counters["invalid_not_png"] == 1
    assert counters["invalid_bad_png_header"] == 2
    assert counters["dropped_invalid"] == 3
    assert counters["received"] == 7
    assert counters["pending"] == 0
    assert counters["archived"] == 4
    logged = [orjson.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    dropped = [line for line in logged if line.get("event") == "frame_dropped"]
    assert {line["reason"] for line in dropped} == {"not_png", "bad_png_header"}


async def test_a_reconnect_to_a_new_process_continues_the_png_manifest_overwriting_nothing(
    service: ServiceFactory, s3
) -> None:
    first = await service(png_batch_frames=2)
    bot = PngBot(first)
    images = pngs(6)
    await bot.send(first, [(0.5 * n, images[n]) for n in range(3)])
    await first.settle()
    await first.runner.cleanup()
    before = {k: s3.head_object(Bucket=first.bucket, Key=k)["ETag"] for k in first.object_keys()}

    second = await service(png_batch_frames=2)
    await bot.send(second, [(0.5 * n, images[n]) for n in range(3, 6)])
    await second.settle()
    check = await archive_of(second, bot.manifest_key)
    assert [f.data for f in check.frames] == images
    assert [b["seq"] for b in check.manifest["batches"]] == [0, 1, 2, 3]
    after = {k: s3.head_object(Bucket=first.bucket, Key=k)["ETag"] for k in second.object_keys()}
    changed = {k for k in before if after[k] != before[k]}
    assert all(k.endswith(("manifest.json", "session.json")) for k in changed)


def test_png_header_check_reads_only_the_signature_and_ihdr() -> None:
    image = pngs(1, (64, 48))[0]
    assert (read_header(image).width, read_header(image).height) == (64, 48)
    zero_width = bytearray(image)
    zero_width[16:20] = struct.pack(">I", 0)
    zero_width[29:33] = struct.pack(">I", zlib.crc32(bytes(zero_width[12:29])))
    for bad, reason in [(b"", "not_png"), (bytes(zero_width), "bad_png_header")]:
        with pytest.raises(MediaError) as raised:
            read_header(bad)
        assert raised.value.reason == reason


async def test_a_batch_left_open_by_a_crashed_process_is_recovered_from_its_journal(
    service: ServiceFactory, tmp_path: Path
) -> None:
    stream = StreamId(RecordingId("bot-1", "rec-1"), "100", "webcam", "png")
    context = RecordingContext({"id": "bot-1", "metadata": {}}, {"id": "rec-1"}, None, None)
    header = stream_header(stream, context, {"id": 100, "name": "Ada"})
    spool_dir = tmp_path / "spool"
    journal = StreamJournal(SpoolFolders(spool_dir).journal(stream.journal_name), header)
    batcher = PngBatcher(max_frames=60, max_s=30.0, journal=journal)
    images = pngs(3)
    for n, image in enumerate(images):
        assert batcher.push(image, 1.0 + 0.5 * n, datetime.now(UTC)) == []
    journal.close(remove=False)  # the process dies here, its batch still open

    running = await service(spool_dir=str(spool_dir))
    async with asyncio.timeout(10):
        while (raw := await running.store.get(stream.manifest_key)) is None:  # noqa: ASYNC110 (polls S3)
            await asyncio.sleep(0.05)
    manifest = orjson.loads(raw)
    validate(manifest)
    assert manifest["status"] == "interrupted"
    assert manifest["recovered_ranges"] == [{"start": 1.0, "end": 2.0}]
    check = await archive_of(running, stream.manifest_key)
    assert [f.data for f in check.frames] == images
    assert [f.relative_s for f in check.frames] == [1.0, 1.5, 2.0]
    assert check.manifest["batches"][0]["recovered"] is True
