"""End to end: the simulator streams H.264 into the service, the archive is read back from S3
and decoded."""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
from collections import defaultdict

import av
import pytest

from archiver.consumers.decode_check import check_stream
from archiver.tools.simulator import Simulation, run_simulation
from tests.conftest import RunningService, ServiceFactory


def stream_prefix(sim: Simulation, participant_id: int, video_type: str) -> str:
    return f"{sim.bot_id}/{sim.recording_id}/participants/{participant_id}/{video_type}/h264"


async def archive_of(
    service: RunningService, sim: Simulation, participant_id: int, video_type: str = "webcam"
):
    key = f"{stream_prefix(sim, participant_id, video_type)}/manifest.json"
    check = await check_stream(service.store, key, key_prefix="archive/")
    assert check.ok, check.problems
    return check


async def test_every_frame_after_first_keyframe_decodes_in_order_with_its_timestamp(
    service: ServiceFactory,
) -> None:
    running = await service()
    sim = await run_simulation(
        Simulation(
            url=running.url,
            participants=2,
            seconds=7,
            fps=15,
            start_relative_s=3.25,
            keyframe_interval_s=1.0,
        )
    )
    await running.settle()
    for stream in sim.streams:
        check = await archive_of(running, sim, stream.participant_id)
        sent = [f.relative_s for f in stream.sent]
        decoded = [f.time_s for f in check.frames]
        assert len(decoded) == len(sent) == 105
        assert all(abs(d - s) < 0.001 for d, s in zip(decoded, sent, strict=True))
        manifest = check.manifest
        assert manifest["status"] == "complete"
        assert manifest["codec"] == "avc1.42C01F"
        assert manifest["counters"]["archived"] == 105
        segments = manifest["segments"]
        assert len(segments) == 4
        assert all(s["starts_with_keyframe"] for s in segments)
        assert [s["seq"] for s in segments] == list(range(len(segments)))
        for earlier, later in itertools.pairwise(segments):
            assert earlier["end"] == pytest.approx(later["start"], abs=1e-5)
        assert segments[0]["start"] == pytest.approx(3.25)
        assert manifest["bot"]["metadata"] == {"team": "sales"}
        assert manifest["participant"]["name"] == f"Participant {stream.participant_id}"


async def test_resolution_change_starts_a_new_init_segment_with_frames_of_the_new_size(
    service: ServiceFactory,
) -> None:
    running = await service()
    sim = await run_simulation(
        Simulation(
            url=running.url,
            participants=1,
            seconds=6,
            fps=10,
            resize_at_s=3.0,
            size=(320, 240),
            resize_to=(640, 360),
        )
    )
    await running.settle()
    check = await archive_of(running, sim, 100)
    segments = check.manifest["segments"]
    assert len({s["init_key"] for s in segments}) == 2
    assert {(s["width"], s["height"]) for s in segments} == {(320, 240), (640, 360)}
    assert check.manifest["counters"]["configurations"] == 2
    sizes = {round(f.time_s, 3): (f.width, f.height) for f in check.frames}
    assert len(sizes) == 60
    assert all(size == ((320, 240) if t < 3.0 else (640, 360)) for t, size in sizes.items())


async def test_single_keyframe_stream_is_cut_near_target_and_decodes_in_order(
    service: ServiceFactory,
) -> None:
    running = await service(segment_target_s=1.0)
    sim = await run_simulation(Simulation(url=running.url, participants=1, seconds=8, fps=10))
    await running.settle()
    check = await archive_of(running, sim, 100)
    segments = check.manifest["segments"]
    assert sum(f.keyframe for f in sim.streams[0].sent) == 1
    assert len(segments) == 4
    assert segments[0]["starts_with_keyframe"] is True
    assert not any(s["starts_with_keyframe"] for s in segments[1:])
    assert all(s["end"] - s["start"] == pytest.approx(2.0, abs=0.11) for s in segments)
    assert len(check.frames) == 80
    assert check.manifest["counters"]["forced_cuts"] == 3


async def test_two_bots_with_several_participants_stay_separate(service: ServiceFactory) -> None:
    running = await service()
    sims = [
        Simulation(url=running.url, participants=3, seconds=3, fps=10, screenshare=True),
        Simulation(url=running.url, participants=2, seconds=3, fps=10, size=(256, 144)),
    ]
    await asyncio.gather(*(run_simulation(sim) for sim in sims))
    await running.settle()
    for sim in sims:
        session = await running.json(f"{sim.bot_id}/{sim.recording_id}/session.json")
        assert len(session["streams"]) == len(sim.streams)
        for stream in sim.streams:
            check = await archive_of(running, sim, stream.participant_id, stream.video_type)
            assert len(check.frames) == len(stream.sent)
            assert {(f.width, f.height) for f in check.frames} == {sim.size}
            assert check.manifest["bot"]["id"] == sim.bot_id
            assert check.manifest["participant"]["id"] == stream.participant_id
    listed = running.object_keys()
    assert len([k for k in listed if sims[0].bot_id in k]) > 0
    assert all((sims[0].bot_id in k) != (sims[1].bot_id in k) for k in listed)


async def test_segments_of_one_configuration_play_end_to_end_behind_their_init(
    service: ServiceFactory, s3
) -> None:
    running = await service()
    sim = await run_simulation(
        Simulation(url=running.url, participants=1, seconds=5, fps=12, keyframe_interval_s=2)
    )
    await running.settle()
    manifest = await running.json(f"{stream_prefix(sim, 100, 'webcam')}/manifest.json")
    by_init = defaultdict(list)
    for segment in manifest["segments"]:
        by_init[segment["init_key"]].append(segment)
    assert len(by_init) == 1
    ((init_key, segments),) = by_init.items()
    body = s3.get_object(Bucket=running.bucket, Key=init_key)["Body"].read()
    for segment in segments:
        data = s3.get_object(Bucket=running.bucket, Key=segment["key"])["Body"].read()
        assert hashlib.sha256(data).hexdigest() == segment["sha256"]
        body += data
    with av.open(io.BytesIO(body), "r") as container:
        stream = container.streams.video[0]
        times = [float(f.pts * stream.time_base) for f in container.decode(stream)]
    assert times == pytest.approx([f.relative_s for f in sim.streams[0].sent], abs=0.001)
