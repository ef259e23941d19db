"""End to end: the meeting's other events archived beside the video, and one connection that
mixes every kind of message."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest

from archiver.consumers.decode_check import check_events, check_png_stream, check_stream
from archiver.events.log import WRITER
from archiver.layout import RecordingId
from archiver.tools.simulator import (
    SimulatedStream,
    encode_png_stream,
    encode_stream,
    envelope,
    media_message,
    participant,
    participant_event,
)
from tests.conftest import RunningService, ServiceFactory

START = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)


class Meeting:
    """One recording's ids, and builders for the events a bot sends."""

    def __init__(self) -> None:
        self.recording = RecordingId(str(uuid.uuid4()), str(uuid.uuid4()))
        self.ids = {"bot_id": self.recording.bot_id, "recording_id": self.recording.recording_id}

    def join(self, participant_id: int, relative_s: float) -> dict[str, Any]:
        return participant_event("join", participant_id, relative_s, START, **self.ids)

    def leave(self, participant_id: int, relative_s: float) -> dict[str, Any]:
        return participant_event("leave", participant_id, relative_s, START, **self.ids)

    def transcript(self, participant_id: int, relative_s: float, text: str) -> dict[str, Any]:
        words = [
            {
                "text": word,
                "start_timestamp": {"relative": relative_s + 0.3 * n, "absolute": None},
                "end_timestamp": {"relative": relative_s + 0.3 * n + 0.25, "absolute": None},
            }
            for n, word in enumerate(text.split())
        ]
        inner = {"words": words, "participant": participant(participant_id)}
        return envelope("transcript.data", inner, **self.ids)

    def event(self, name: str, inner: dict[str, Any]) -> dict[str, Any]:
        return envelope(name, inner, **self.ids)


async def send_all(running: RunningService, messages: list[dict[str, Any]]) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        for message in messages:
            await ws.send_str(orjson.dumps(message).decode())


async def test_join_leave_and_transcript_events_come_back_in_order_unchanged(
    service: ServiceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    running = await service()
    meeting = Meeting()
    archived = [
        meeting.join(100, 0.0),
        meeting.join(101, 0.4),
        meeting.transcript(100, 1.5, "good morning everyone"),
        meeting.event("participant_events.speech_on", {"participant": participant(101)}),
        meeting.event("brand_new.event", {"nested": {"list": [1, 2.5, None, "ü"]}}),
        meeting.transcript(101, 3.0, "morning"),
        meeting.leave(101, 4.0),
        meeting.leave(100, 5.0),
    ]
    audio = meeting.event("audio_mixed_raw.data", {"buffer": "AAAA", "timestamp": None})
    anonymous = {"event": "participant_events.join", "data": {"bot": {"id": "../x"}}}
    await send_all(running, [*archived[:3], audio, anonymous, *archived[3:]])
    await running.settle()

    check = await check_events(running.store, meeting.recording, key_prefix="archive/")
    assert check.ok, check.problems
    assert check.events == archived
    assert check.lines == [orjson.dumps(message) for message in archived]
    manifest = check.manifest
    schema = resources.files("archiver").joinpath("schema/events-manifest.schema.json")
    jsonschema.validate(
        manifest, json.loads(schema.read_text()), format_checker=jsonschema.FormatChecker()
    )
    assert manifest["status"] == "complete"
    assert manifest["bot"] == {"id": meeting.recording.bot_id, "metadata": {"team": "sales"}}
    assert manifest["counters"]["events"] == 8
    assert manifest["counters"]["audio_buffers_skipped"] == 1
    assert manifest["event_types"] == {
        "participant_events.join": 2,
        "participant_events.leave": 2,
        "participant_events.speech_on": 1,
        "transcript.data": 2,
        "brand_new.event": 1,
    }
    (batch,) = manifest["batches"]
    assert (batch["first_relative"], batch["last_relative"]) == (0.0, 5.0)
    assert batch["key"].endswith(f"/events/0000000000000-000000-{WRITER}.jsonl")

    session = await running.json(meeting.recording.session_key)
    assert session["events"]["manifest_key"] == meeting.recording.events_manifest_key
    assert session["events"]["status"] == "complete"
    people = {p["id"]: p for p in session["participants"]}
    assert people["100"]["name"] == "Participant 100"
    assert [t["relative"] for t in people["100"]["joins"]] == [0.0]
    assert [t["relative"] for t in people["100"]["leaves"]] == [5.0]
    assert people["101"]["leaves"][0]["absolute"] == (START + timedelta(seconds=4)).isoformat()
    assert not any("audio" in key for key in running.object_keys())

    await running.runner.cleanup()
    logged = [orjson.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    (closed,) = [line for line in logged if line.get("event") == "connection_closed"]
    assert closed["refused_event_without_recording"] == 1
    assert closed["audio_skipped"] == 1


async def test_events_batches_close_on_count_on_time_and_at_connection_end(
    service: ServiceFactory,
) -> None:
    running = await service(events_batch_count=3, events_batch_s=10.0)
    meeting = Meeting()
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 20.0, 21.0]
    sent = [meeting.join(100 + n, t) for n, t in enumerate(times)]
    await send_all(running, sent)
    await running.settle()
    check = await check_events(running.store, meeting.recording, key_prefix="archive/")
    assert check.ok, check.problems
    assert check.events == sent
    batches = check.manifest["batches"]
    assert [(b["count"], b["first_relative"], b["last_relative"]) for b in batches] == [
        (3, 0.0, 2.0),  # three events: the count closes it
        (2, 3.0, 4.0),  # the next event is 10 s or more after 3.0: time closes it
        (2, 20.0, 21.0),  # the connection ends
    ]
    keys = [b["key"].rsplit("/", 1)[1] for b in batches]
    assert keys == [
        f"0000000000000-000000-{WRITER}.jsonl",
        f"0000003000000-000001-{WRITER}.jsonl",
        f"0000020000000-000002-{WRITER}.jsonl",
    ]


async def test_a_quiet_recording_stores_its_open_batch_after_the_time_limit(
    service: ServiceFactory,
) -> None:
    running = await service(events_batch_s=0.3)
    meeting = Meeting()
    chat = meeting.event("participant_events.chat_message", {"text": "hi"})
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        await ws.send_str(orjson.dumps(chat).decode())
        async with asyncio.timeout(10):
            key = meeting.recording.events_manifest_key
            while (raw := await running.store.get(key)) is None:  # noqa: ASYNC110 (polls S3)
                await asyncio.sleep(0.05)
        manifest = orjson.loads(raw)
        assert manifest["status"] == "live"
        assert [b["count"] for b in manifest["batches"]] == [1]
        assert not ws.closed
    await running.settle()
    check = await check_events(running.store, meeting.recording, key_prefix="archive/")
    assert check.events == [chat]
    assert check.manifest["status"] == "complete"


async def test_one_connection_mixing_h264_png_and_events_archives_each_in_its_place(
    service: ServiceFactory,
) -> None:
    running = await service(png_batch_frames=3)
    meeting = Meeting()
    h264 = SimulatedStream(100, "webcam", [(0.0, (160, 120))])
    png_webcam = SimulatedStream(101, "webcam", [(0.0, (160, 90))], "png")
    png_screen = SimulatedStream(102, "screenshare", [(0.0, (320, 180))], "png")
    timeline: list[tuple[float, int, dict[str, Any]]] = []
    for relative, data, _ in encode_stream(h264, 2, 10, keyframe_interval_s=1):
        message = media_message(data, relative, START, "webcam", 100, **meeting.ids)
        timeline.append((relative, 1, message))
    for stream in (png_webcam, png_screen):
        for relative, data, _ in encode_png_stream(stream, 2, 2):
            message = media_message(
                data,
                relative,
                START,
                stream.video_type,
                stream.participant_id,
                event="video_separate_png.data",
                **meeting.ids,
            )
            timeline.append((relative, 1, message))
    for pid in (100, 101, 102):
        timeline.append((0.0, 0, meeting.join(pid, 0.0)))
        timeline.append((2.0, 2, meeting.leave(pid, 2.0)))
    timeline.append((1.0, 1, meeting.transcript(100, 1.0, "hello")))
    timeline.sort(key=lambda item: (item[0], item[1]))
    await send_all(running, [message for _, _, message in timeline])
    await running.settle()

    prefix = f"archive/{meeting.recording.prefix}"
    h264_key = f"{meeting.recording.prefix}/participants/100/webcam/h264/manifest.json"
    video = await check_stream(running.store, h264_key, key_prefix="archive/")
    assert video.ok, video.problems
    assert len(video.frames) == 20
    for stream, size in ((png_webcam, (160, 90)), (png_screen, (320, 180))):
        key = (
            f"{meeting.recording.prefix}/participants/{stream.participant_id}"
            f"/{stream.video_type}/png/manifest.json"
        )
        frames = await check_png_stream(running.store, key, key_prefix="archive/")
        assert frames.ok, frames.problems
        assert [f.relative_s for f in frames.frames] == [0.0, 0.5, 1.0, 1.5]
        assert {(f.width, f.height) for f in frames.frames} == {size}
        assert [b["frame_count"] for b in frames.manifest["batches"]] == [3, 1]
    events = await check_events(running.store, meeting.recording, key_prefix="archive/")
    assert events.ok, events.problems
    assert [e["event"] for e in events.events] == [
        *["participant_events.join"] * 3,
        "transcript.data",
        *["participant_events.leave"] * 3,
    ]

    session = await running.json(meeting.recording.session_key)
    assert sorted((s["participant_id"], s["type"], s["format"]) for s in session["streams"]) == [
        ("100", "webcam", "h264"),
        ("101", "webcam", "png"),
        ("102", "screenshare", "png"),
    ]
    assert all(s["status"] == "complete" for s in session["streams"])
    assert [len(p["joins"]) for p in session["participants"]] == [1, 1, 1]
    places = {
        "/participants/100/webcam/h264/": (".mp4", ".m4s", "manifest.json", "playlist.m3u8"),
        "/participants/101/webcam/png/": (".tar", "manifest.json"),
        "/participants/102/screenshare/png/": (".tar", "manifest.json"),
        "/events/": (".jsonl", "manifest.json"),
    }
    for key in running.object_keys():
        assert key.startswith(prefix)
        rest = key.removeprefix(prefix)
        if rest in ("/session.json", "/participants/100/playlist.m3u8"):
            continue
        (place,) = [p for p in places if rest.startswith(p)]
        assert rest.endswith(places[place]), key


async def test_a_reconnect_to_a_new_process_continues_the_events_and_the_session_index(
    service: ServiceFactory,
) -> None:
    meeting = Meeting()
    first = await service()
    earlier = [meeting.join(100, 0.0), meeting.transcript(100, 2.0, "can you hear me")]
    await send_all(first, earlier)
    await first.settle()
    await first.runner.cleanup()

    second = await service()
    later = [meeting.join(101, 9.0), meeting.leave(100, 12.0)]
    await send_all(second, later)
    await second.settle()
    check = await check_events(second.store, meeting.recording, key_prefix="archive/")
    assert check.ok, check.problems
    assert check.events == [*earlier, *later]
    assert [b["seq"] for b in check.manifest["batches"]] == [0, 1]
    assert check.manifest["counters"]["events"] == 4
    session = await second.json(meeting.recording.session_key)
    people = {p["id"]: p for p in session["participants"]}
    assert [t["relative"] for t in people["100"]["joins"]] == [0.0]
    assert [t["relative"] for t in people["100"]["leaves"]] == [12.0]
    assert [t["relative"] for t in people["101"]["joins"]] == [9.0]


@pytest.mark.parametrize("relative", [1.7976931348623157e308, 1e300, -3.0])
async def test_an_event_with_an_absurd_time_is_archived_in_a_batch_of_its_own_name(
    service: ServiceFactory, relative: float
) -> None:
    """Found by fuzzing: an event whose relative time overflowed to infinity in its batch's
    key ended the events log's writer."""
    running = await service(events_batch_count=1)
    meeting = Meeting()
    sent = [
        meeting.join(100, 0.0),
        meeting.transcript(100, relative, "hello"),
        meeting.leave(100, 2),
    ]
    await send_all(running, sent)
    await running.settle()
    check = await check_events(running.store, meeting.recording, key_prefix="archive/")
    assert check.ok, check.problems
    assert check.events == sent
