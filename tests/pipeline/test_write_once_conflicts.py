"""A write-once key that already holds other bytes (another writer won the race for it)
loses nothing and lies about nothing: the segment is stored under a key of its own and
listed there, with the checksum of what that key holds."""

from __future__ import annotations

import hashlib

from archiver.consumers.decode_check import check_stream
from archiver.ingest.server import STATE
from archiver.tools.simulator import Simulation, run_simulation
from tests.conftest import ServiceFactory


async def test_a_segment_whose_key_is_taken_is_listed_under_its_own(
    service: ServiceFactory, s3: object
) -> None:
    running = await service()
    sim = Simulation(url=running.url, participants=1, seconds=3, fps=10, keyframe_interval_s=1)
    prefix = f"archive/{sim.bot_id}/{sim.recording_id}/participants/100/webcam/h264"
    taken = f"{prefix}/segments/0000000000000.m4s"
    theirs = b"another writer's segment"
    s3.put_object(Bucket=running.bucket, Key=taken, Body=theirs)  # type: ignore[attr-defined]
    await run_simulation(sim)
    await running.settle()
    key = f"{prefix.removeprefix('archive/')}/manifest.json"
    check = await check_stream(running.store, key, key_prefix="archive/")
    assert check.ok, check.problems
    assert len(check.frames) == 30
    first = check.manifest["segments"][0]
    assert first["key"] != taken
    assert first["key"].startswith(f"{prefix}/segments/0000000000000-")
    stored = s3.get_object(Bucket=running.bucket, Key=first["key"])["Body"].read()  # type: ignore[attr-defined]
    assert hashlib.sha256(stored).hexdigest() == first["sha256"]
    kept = s3.get_object(Bucket=running.bucket, Key=taken)["Body"].read()  # type: ignore[attr-defined]
    assert kept == theirs
    assert running.app[STATE].spool.counters["conflicts"] == 1


async def test_an_init_segment_whose_key_is_taken_is_named_where_it_was_stored(
    service: ServiceFactory, s3: object
) -> None:
    """Every segment behind it names the init segment's own key, and decodes."""
    running = await service()
    options = {"participants": 1, "seconds": 3, "fps": 10, "keyframe_interval_s": 1}
    learn = Simulation(url=running.url, **options)  # type: ignore[arg-type]
    await run_simulation(learn)
    await running.settle()
    learned = await check_stream(
        running.store,
        f"{learn.bot_id}/{learn.recording_id}/participants/100/webcam/h264/manifest.json",
        key_prefix="archive/",
    )
    init_name = learned.manifest["segments"][0]["init_key"].rpartition("/")[2]

    sim = Simulation(url=running.url, **options)  # type: ignore[arg-type]
    prefix = f"archive/{sim.bot_id}/{sim.recording_id}/participants/100/webcam/h264"
    taken = f"{prefix}/{init_name}"
    theirs = b"another writer's init segment"
    s3.put_object(Bucket=running.bucket, Key=taken, Body=theirs)  # type: ignore[attr-defined]
    await run_simulation(sim)
    await running.settle()
    key = f"{prefix.removeprefix('archive/')}/manifest.json"
    check = await check_stream(running.store, key, key_prefix="archive/")
    assert check.ok, check.problems
    assert len(check.frames) == 30
    init_keys = {segment["init_key"] for segment in check.manifest["segments"]}
    assert len(init_keys) == 1
    (moved,) = init_keys
    assert moved != taken
    assert moved.startswith(f"{prefix}/{init_name.removesuffix('.mp4')}-")
    stored = s3.get_object(Bucket=running.bucket, Key=moved)["Body"].read()  # type: ignore[attr-defined]
    assert stored[4:8] == b"ftyp"
    kept = s3.get_object(Bucket=running.bucket, Key=taken)["Body"].read()  # type: ignore[attr-defined]
    assert kept == theirs
