"""What is uploaded is listed, whatever kills the worker: a long stream with PNG batches and
events, the worker SIGKILLed after dozens of segments, and a kill during an S3 outage with
documents still in the spool."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from archiver.consumers.decode_check import check_events, check_png_stream, check_stream
from archiver.layout import RecordingId, StreamId
from archiver.tools.simulator import (
    SimulatedStream,
    encode_png_stream,
    encode_stream,
    envelope,
    media_message,
    participant,
    participant_event,
)
from tests.conftest import client
from tests.faults.conftest import RestartableS3, ServiceProcess, ServiceProcesses

FPS = 15
PNG_FPS = 2
SPEED = 4.0
"""Media seconds sent per wall-clock second."""


def transcript_event(
    relative_s: float, n: int, bot_id: str, recording_id: str, start: datetime
) -> dict[str, Any]:
    word = {
        "text": f"word{n}",
        "start_timestamp": {"relative": relative_s, "absolute": start.isoformat()},
        "end_timestamp": {"relative": relative_s + 0.1, "absolute": start.isoformat()},
    }
    inner = {"words": [word], "participant": participant(100)}
    return envelope("transcript.data", inner, bot_id, recording_id)


@dataclass
class Meeting:
    """One recording: participant 100's H.264 webcam, 101's PNG webcam, a transcript event
    every 10 H.264 frames; every message serialised in time order before sending."""

    seconds: float
    bot_id: str = "bot-kill"
    recording_id: str = field(default_factory=lambda: f"rec-{time.monotonic_ns()}")
    start: datetime = field(default_factory=lambda: datetime.now(UTC))
    timeline: list[tuple[float, str, str]] = field(default_factory=list)
    """(relative time, "h264" | "png" | "event", message)."""
    sent: dict[str, list[float]] = field(default_factory=dict)
    sent_events: list[bytes] = field(default_factory=list)

    @property
    def recording(self) -> RecordingId:
        return RecordingId(self.bot_id, self.recording_id)

    def stream(self, participant_id: int, media_format: str) -> StreamId:
        return StreamId(self.recording, str(participant_id), "webcam", media_format)  # type: ignore[arg-type]

    def encode(self) -> None:
        ids = {"bot_id": self.bot_id, "recording_id": self.recording_id}
        h264 = SimulatedStream(100, "webcam", [(0.0, (320, 240))])
        for index, (relative, data, _) in enumerate(encode_stream(h264, self.seconds, FPS, 0.5)):
            message = media_message(data, relative, self.start, "webcam", 100, **ids)
            self.timeline.append((relative, "h264", orjson.dumps(message).decode()))
            if index % 10 == 5:
                event = transcript_event(relative, index, start=self.start, **ids)
                self.timeline.append((relative, "event", orjson.dumps(event).decode()))
        png = SimulatedStream(101, "webcam", [(0.0, (160, 90))], "png")
        for relative, data, _ in encode_png_stream(png, self.seconds, PNG_FPS):
            message = media_message(
                data, relative, self.start, "webcam", 101, event="video_separate_png.data", **ids
            )
            self.timeline.append((relative, "png", orjson.dumps(message).decode()))
        self.timeline.sort(key=lambda item: item[0])
        self.sent = {"h264": [], "png": []}

    def joins(self) -> list[str]:
        ids = {"bot_id": self.bot_id, "recording_id": self.recording_id}
        return [
            orjson.dumps(participant_event("join", pid, 0.0, self.start, **ids)).decode()
            for pid in (100, 101)
        ]


async def send(
    ws: aiohttp.ClientWebSocketResponse,
    meeting: Meeting,
    first: int,
    until_s: float,
    until: asyncio.Future[Any] | None = None,
) -> int:
    """Send the timeline from `first` up to media time `until_s` (or, with `until`, from
    then on until it is done or the connection drops), at SPEED times real time; return the
    index of the first message not sent."""
    began = time.monotonic()
    offset = meeting.timeline[first][0] if first < len(meeting.timeline) else 0.0
    index = first
    while index < len(meeting.timeline) and (
        meeting.timeline[index][0] < until_s or (until is not None and not until.done())
    ):
        relative, kind, text = meeting.timeline[index]
        delay = (relative - offset) / SPEED - (time.monotonic() - began)
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await ws.send_str(text)
        except aiohttp.ClientConnectionResetError:
            if until is None:
                raise
            break  # The worker was killed under this connection.
        if kind == "event":
            meeting.sent_events.append(text.encode())
        else:
            meeting.sent[kind].append(relative)
        index += 1
    return index


async def kill_worker(service: ServiceProcess) -> None:
    """SIGKILL the worker, then wait for the supervisor's new one to answer."""
    killed = service.worker_pid()
    os.kill(killed, signal.SIGKILL)
    await wait_for_new_worker(service, killed)


def kill_when_spooled(service: ServiceProcess, key: str, timeout_s: float) -> bool:
    """SIGKILL the worker the moment a version of document `key` is in its spool (written,
    not yet confirmed by the store): a kill during a manifest write. Polls without pause,
    the window is a PUT long; kills anyway after `timeout_s`. Whether it caught one."""
    suffix = f"-{hashlib.sha256(key.encode()).hexdigest()[:16]}.meta"
    folder = service.slot() / "objects"
    worker = service.worker_pid()
    deadline = time.monotonic() + timeout_s
    caught = False
    while not caught and time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            caught = any(name.endswith(suffix) for name in os.listdir(folder))
    os.kill(worker, signal.SIGKILL)
    return caught


async def wait_for_new_worker(service: ServiceProcess, killed: int) -> None:
    async with asyncio.timeout(30):
        while True:
            if _workers(service) not in ([], [killed]):
                break
            await asyncio.sleep(0.05)
    await service.wait_healthy()


def _workers(service: ServiceProcess) -> list[int]:
    assert service.process is not None
    pid = service.process.pid
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def documents(stream_prefix: str) -> set[str]:
    """An H.264 stream's manifest and playlist: documents, not listed objects."""
    return {f"archive/{stream_prefix}/manifest.json", f"archive/{stream_prefix}/playlist.m3u8"}


def stored_keys(services: ServiceProcesses, prefix: str) -> set[str]:
    pages = client(services.s3.endpoint).get_paginator("list_objects_v2")
    return {
        obj["Key"]
        for page in pages.paginate(Bucket=services.bucket, Prefix=f"archive/{prefix}/")
        for obj in page.get("Contents", [])
    }


async def wait_for_status(
    services: ServiceProcesses, key: str, statuses: tuple[str, ...], timeout_s: float = 60
) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            raw = await services.store.get(key)
            if raw is not None and (document := orjson.loads(raw))["status"] in statuses:
                return document  # type: ignore[no-any-return]
            await asyncio.sleep(0.2)


async def spool_emptied(service: ServiceProcess, timeout_s: float = 60) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            status, readiness = await service.readiness()
            if status == 200 and readiness["spool_pending_bytes"] == 0:
                return
            await asyncio.sleep(0.2)


def lost_near(
    sent: list[float], archived: list[float], kills: list[float], window_s: float
) -> None:
    """Every frame sent but not archived was sent within `window_s` (media time) before a
    kill (in flight to the killed worker), or after it but before the next key frame (a new
    connection starts at one): nothing else is lost."""
    kept = {round(t, 3) for t in archived}
    for t in sent:
        if round(t, 3) not in kept:
            assert any(kill - window_s <= t <= kill + 1 for kill in kills), f"lost {t:.3f} s"


def assert_listed_exactly(stored: set[str], listed: list[str], what: str) -> None:
    assert len(listed) == len(set(listed)), f"{what} listed twice"
    assert stored == set(listed), (
        f"{what}: stored, not listed {sorted(stored - set(listed))}; "
        f"listed, not stored {sorted(set(listed) - stored)}"
    )


async def test_killed_twice_during_a_long_stream_every_stored_object_is_listed(
    services: ServiceProcesses,
) -> None:
    service = await services.start(
        segment_target_s=0.5,
        png_batch_frames=4,
        events_batch_count=3,
        idle_timeout_s=60,
    )
    meeting = Meeting(seconds=40)
    await asyncio.to_thread(meeting.encode)
    h264 = meeting.stream(100, "h264")
    png = meeting.stream(101, "png")
    kills: list[float] = []
    async with aiohttp.ClientSession() as session:
        # Killed at 14 s, wherever the worker is (most likely between manifest writes).
        async with session.ws_connect(service.url) as ws:
            for join in meeting.joins():
                await ws.send_str(join)
                meeting.sent_events.append(join.encode())
            index = await send(ws, meeting, 0, 14.0)
            kills.append(meeting.timeline[index - 1][0])
            await kill_worker(service)
            await ws.receive()
        # From 27 s on, killed during a write of the H.264 manifest.
        async with session.ws_connect(service.url) as ws:
            worker = service.worker_pid()
            index = await send(ws, meeting, index, 27.0)
            killing = asyncio.ensure_future(
                asyncio.to_thread(kill_when_spooled, service, h264.manifest_key, 10)
            )
            index = await send(ws, meeting, index, 0.0, until=killing)
            caught_a_manifest_write = await killing
            kills.append(meeting.timeline[index - 1][0])
            await wait_for_new_worker(service, worker)
            await ws.receive()
        async with session.ws_connect(service.url) as ws:
            await send(ws, meeting, index, meeting.seconds + 1)
    for stream in (h264, png):
        await wait_for_status(services, stream.manifest_key, ("complete",))
    await spool_emptied(service)

    video = await check_stream(services.store, h264.manifest_key, key_prefix="archive/")
    assert video.ok, video.problems
    segments = [s["key"] for s in video.manifest["segments"]]
    inits = {s["init_key"] for s in video.manifest["segments"]}
    assert_listed_exactly(
        stored_keys(services, h264.prefix) - documents(h264.prefix) - inits,
        segments,
        "segments",
    )
    assert any(s["recovered"] for s in video.manifest["segments"])
    lost_near(meeting.sent["h264"], [f.time_s for f in video.frames], kills, window_s=3)

    batches = await check_png_stream(services.store, png.manifest_key, key_prefix="archive/")
    assert batches.ok, batches.problems
    assert_listed_exactly(
        stored_keys(services, png.prefix) - {f"archive/{png.manifest_key}"},
        [b["key"] for b in batches.manifest["batches"]],
        "PNG batches",
    )
    lost_near(meeting.sent["png"], [f.relative_s for f in batches.frames], kills, window_s=3)

    events_manifest = await wait_for_status(
        services, meeting.recording.events_manifest_key, ("complete", "interrupted")
    )
    events = await check_events(services.store, meeting.recording, key_prefix="archive/")
    assert events.ok, events.problems
    assert_listed_exactly(
        stored_keys(services, f"{meeting.recording.prefix}/events")
        - {f"archive/{meeting.recording.events_manifest_key}"},
        [b["key"] for b in events_manifest["batches"]],
        "events batches",
    )
    assert set(events.lines) <= set(meeting.sent_events)
    assert len(events.lines) == len(set(events.lines))
    lost_events = len(meeting.sent_events) - len(events.lines)

    assert caught_a_manifest_write
    frames = len(video.frames), len(meeting.sent["h264"])
    pngs = len(batches.frames), len(meeting.sent["png"])
    print(
        f"\nkilled at {kills} s: h264 frames listed {frames[0]}/{frames[1]} "
        f"({len(segments)} segments, "
        f"{video.manifest['counters'].get('dropped_before_keyframe', 0)} dropped before a "
        f"key frame), png frames {pngs[0]}/{pngs[1]} "
        f"({len(batches.manifest['batches'])} batches), events {len(events.lines)}/"
        f"{len(meeting.sent_events)} ({len(events_manifest['batches'])} batches)"
    )
    assert frames[1] - frames[0] <= 2 * 3 * FPS
    assert lost_events <= 2 * 3 * FPS // 10
    recovering = [line for line in service.logs() if line["event"] == "recovering"]
    assert len(recovering) == 2
    assert all(line["unlisted_objects"] > 0 for line in recovering)


async def test_killed_during_an_s3_outage_with_documents_in_the_spool(
    services: ServiceProcesses, outage_s3: RestartableS3
) -> None:
    service = await services.start(
        segment_target_s=0.5, png_batch_frames=4, events_batch_count=3, idle_timeout_s=60
    )
    meeting = Meeting(seconds=12)
    await asyncio.to_thread(meeting.encode)
    h264 = meeting.stream(100, "h264")
    recording = meeting.recording
    ids = {"bot_id": meeting.bot_id, "recording_id": meeting.recording_id}
    late_join = orjson.dumps(participant_event("join", 102, 5.0, meeting.start, **ids)).decode()
    async with aiohttp.ClientSession() as session, session.ws_connect(service.url) as ws:
        for join in meeting.joins():
            await ws.send_str(join)
            meeting.sent_events.append(join.encode())
        index = await send(ws, meeting, 0, 4.0)
        await wait_for_status(services, h264.manifest_key, ("live",))
        outage_s3.stop()
        await ws.send_str(late_join)
        meeting.sent_events.append(late_join.encode())
        index = await send(ws, meeting, index, 8.0)
        async with asyncio.timeout(10):
            while True:
                if (await service.readiness())[1]["upload_retries"]:
                    break
                await asyncio.sleep(0.1)
        killed = service.worker_pid()
        assert await asyncio.to_thread(kill_when_spooled, service, recording.session_key, 20)
        await wait_for_new_worker(service, killed)
        await ws.receive()
    # The bot is back while S3 is still down: what it sends waits behind recovery.
    async with aiohttp.ClientSession() as session, session.ws_connect(service.url) as ws:
        await send(ws, meeting, index, meeting.seconds + 1)
        outage_s3.start()

    for stream in (h264, meeting.stream(101, "png")):
        await wait_for_status(services, stream.manifest_key, ("complete",))
    await spool_emptied(service)
    video = await check_stream(services.store, h264.manifest_key, key_prefix="archive/")
    assert video.ok, video.problems
    segments = [s["key"] for s in video.manifest["segments"]]
    inits = {s["init_key"] for s in video.manifest["segments"]}
    assert_listed_exactly(
        stored_keys(services, h264.prefix) - documents(h264.prefix) - inits,
        segments,
        "segments",
    )
    lost_near(meeting.sent["h264"], [f.time_s for f in video.frames], [8.0], window_s=3)

    events_manifest = await wait_for_status(services, recording.events_manifest_key, ("complete",))
    events = await check_events(services.store, recording, key_prefix="archive/")
    assert events.ok, events.problems
    assert_listed_exactly(
        stored_keys(services, f"{recording.prefix}/events")
        - {f"archive/{recording.events_manifest_key}"},
        [b["key"] for b in events_manifest["batches"]],
        "events batches",
    )
    assert late_join.encode() in events.lines
    assert events_manifest["counters"]["events"] == events_manifest["events"]
    (recovering,) = [line for line in service.logs() if line["event"] == "recovering"]
    assert recording.session_key in recovering["manifests"]

    async with asyncio.timeout(30):
        while True:
            raw = await services.store.get(recording.session_key)
            session_index = orjson.loads(raw) if raw is not None else {}
            joined = {p["id"] for p in session_index.get("participants", []) if p.get("joins")}
            if joined == {"100", "101", "102"}:
                break
            await asyncio.sleep(0.2)
