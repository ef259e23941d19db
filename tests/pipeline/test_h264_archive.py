"""End to end: the simulator streams H.264 into the service, the archive is read back from S3
and decoded."""

from __future__ import annotations

from collections import defaultdict

import pytest

from archiver.simulator import Simulation, run_simulation
from archiver.verify import check_stream
from tests.conftest import RunningService, ServiceFactory


def stream_prefix(sim: Simulation, participant_id: int, video_type: str) -> str:
    return (
        f"{sim.bot_id}/{sim.recording_id}/participants/{participant_id}/{video_type}/h264"
    )


async def archive_of(service: RunningService, sim: Simulation, participant_id: int,
                     video_type: str = "webcam"):
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
        for earlier, later in zip(segments, segments[1:], strict=False):
            assert earlier["end"] == pytest.approx(later["start"], abs=1e-5)
        assert segments[0]["start"] == pytest.approx(3.25)
        assert manifest["bot"]["metadata"] == {"team": "sales"}
        assert manifest["participant"]["name"] == f"Participant {stream.participant_id}"
