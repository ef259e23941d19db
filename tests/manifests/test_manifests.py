"""Manifest documents: the published schema, and the live-write budget over a long meeting."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from importlib import resources

import jsonschema
import pytest

from archiver.documents.manifests import SegmentEntry, StreamManifest, WriteBudget, dumps
from archiver.layout import RecordingId, StreamId
from archiver.tools.simulator import Simulation, run_simulation
from archiver.values import RecordingContext
from tests.conftest import ServiceFactory


def schema() -> dict:
    text = resources.files("archiver").joinpath("schema/h264-manifest.schema.json").read_text()
    return json.loads(text)


async def test_archived_manifest_and_session_validate(service: ServiceFactory) -> None:
    running = await service()
    sim = await run_simulation(
        Simulation(url=running.url, participants=1, seconds=3, fps=10, resize_at_s=1.5)
    )
    await running.settle()
    manifest = await running.json(
        f"{sim.bot_id}/{sim.recording_id}/participants/100/webcam/h264/manifest.json"
    )
    jsonschema.validate(manifest, schema(), format_checker=jsonschema.FormatChecker())
    session = await running.json(f"{sim.bot_id}/{sim.recording_id}/session.json")
    assert session["streams"][0]["manifest_key"].endswith("webcam/h264/manifest.json")
    assert session["participants"][0]["name"] == "Participant 100"


@pytest.mark.parametrize("kbps", [150, 600, 2500])
def test_live_manifest_writes_stay_within_ten_percent_over_two_hours(kbps: int) -> None:
    """A 2 h stream of 10 s segments: every write the budget allows is counted."""
    stream = StreamId(RecordingId("bot", "rec"), "100", "webcam", "h264")
    context = RecordingContext({"id": "bot", "metadata": {"k": "v"}}, {"id": "rec"}, None, None)
    manifest = StreamManifest(stream, context, {"id": 100, "name": "Ada"})
    budget = WriteBudget(0.1)
    entry = SegmentEntry(
        key="archive/bot/rec/participants/100/webcam/h264/segments/0000000000000.m4s",
        init_key="archive/bot/rec/participants/100/webcam/h264/init-0123456789abcdef.mp4",
        seq=0,
        start=0.0,
        end=10.0,
        start_wallclock=datetime.now(UTC).isoformat(),
        frames=300,
        starts_with_keyframe=True,
        width=1280,
        height=720,
        codec="avc1.42C01F",
        bytes=kbps * 1000 // 8 * 10,
        sha256="0" * 64,
    )
    budget.count_media(800)
    writes = 0
    for seq in range(720):
        manifest.add(replace(entry, seq=seq, start=seq * 10.0, end=seq * 10.0 + 10))
        budget.count_media(entry.bytes)
        if budget.allows(len(manifest.segments)):
            body = dumps(manifest.document({}))
            budget.count_manifest(len(body), len(manifest.segments))
            writes += 1
    manifest.status = "complete"
    body = dumps(manifest.document({}))
    budget.count_manifest(len(body), len(manifest.segments))
    assert writes >= 10
    assert budget.manifest_requests <= 0.1 * budget.media_requests + 2
    assert budget.manifest_bytes <= 0.1 * budget.media_bytes + len(body)


def test_live_listing_with_its_playlist_keeps_room_for_every_other_document() -> None:
    """2 h of 20 s segments (WebRTC without key frames), each write with its playlist: a
    segment waits for at most 22 more to be listed, and the read at the start, the first,
    live and final writes stay under 9% of the stream's requests, leaving room for its
    recording's session.json and events manifest within 10%."""
    budget = WriteBudget(0.1)
    budget.count_media(800)  # the init segment
    listed, waits = 0, []
    for segment in range(1, 361):
        budget.count_media(3_500_000)
        if budget.allows(segment):
            budget.count_manifest(300 * segment, segment)
            budget.count_companion(100 * segment)
            waits.append(segment - listed - 1)
            listed = segment
    budget.count_manifest(300 * 360, 360)
    budget.count_companion(100 * 360)
    documents = budget.manifest_requests + 1  # and the read that would resume the stream
    assert waits[0] == 0
    assert max(waits) == 22
    assert documents / (documents + budget.media_requests) < 0.09


def test_participant_details_flipping_back_and_forth_keep_the_manifest_small() -> None:
    stream = StreamId(RecordingId("bot-1", "rec-1"), "100", "webcam", "h264")
    context = RecordingContext({"id": "bot-1"}, {"id": "rec-1"}, None, None)
    versions = [
        {"id": 100, "name": "Ada", "extra_data": {"blob": letter * 100_000}} for letter in "ab"
    ]
    manifest = StreamManifest(stream, context, {"id": 100, "name": "Ada"})
    for n in range(3000):
        manifest.update_participant(n / 10, versions[n % 2])
    document = manifest.document({})
    size = len(dumps(document))
    assert size < 1024**2, size
    changes = document["participant_changes"]
    assert changes[0] == {"at": 0.0, "participant": versions[0]}
    assert changes[-1] == {"at": 299.9, "participant": versions[1]}
    assert document["participant_changes_dropped"] == 3000 - len(changes)
    jsonschema.validate(document, schema())
    resumed = StreamManifest(stream, context, versions[1], json.loads(dumps(document)))
    assert resumed.document({})["participant_changes"] == changes
