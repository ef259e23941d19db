"""A recording archived by the real service, for the read side to read back: into a local
folder (`local_archive`) or into the S3 server (`s3_archive`); and a stream continued
mid-GOP by a second service (`continued_local`, `continued_s3`, `continued_viewer`)."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp
import av
import orjson
import pytest
from aiohttp import web

from archiver import logs
from archiver.ingest.server import STATE
from archiver.service.app import create_app
from archiver.settings import Settings
from archiver.store import LocalFolderStore
from archiver.tools.simulator import Simulation, encode_stream, media_message, run_simulation
from tests.conftest import TOKEN, ServiceFactory, serve_locally
from tests.speech import RATE, meeting_audio, send_audio, speaker


@dataclass
class Archived:
    """What was sent, and where the archive of it lies."""

    store_url: str
    simulations: list[Simulation] = field(default_factory=list)
    endpoint_url: str | None = None
    url: str = ""
    """The service's websocket, for what a test sends besides the simulations."""
    app: web.Application | None = None

    @property
    def bot_id(self) -> str:
        return self.simulations[0].bot_id

    @property
    def recording_id(self) -> str:
        return self.simulations[0].recording_id

    @property
    def ids(self) -> list[str]:
        return ["--bot", self.bot_id, "--recording", self.recording_id]

    @property
    def endpoint_args(self) -> list[str]:
        return [] if self.endpoint_url is None else ["--s3-endpoint-url", self.endpoint_url]

    def stream_prefix(self, participant_id: int, video_type: str, media_format: str) -> str:
        return (
            f"{self.bot_id}/{self.recording_id}/participants/{participant_id}/{video_type}"
            f"/{media_format}"
        )


Simulate = Callable[..., Awaitable[Archived]]


async def _settle(app: web.Application) -> None:
    """Until every connection has closed and every stream is written out."""
    state = app[STATE]
    deadline = time.monotonic() + 30
    while state.connections and time.monotonic() < deadline:  # noqa: ASYNC110 (a counter)
        await asyncio.sleep(0.02)
    await asyncio.wait_for(state.writers.wait_idle(), deadline - time.monotonic())


async def _simulate(url: str, app: web.Application, archived: Archived, **options: Any) -> None:
    if archived.simulations:
        options.setdefault("bot_id", archived.bot_id)
        options.setdefault("recording_id", archived.recording_id)
    sim = await run_simulation(Simulation(url=url, **options))
    archived.simulations.append(sim)
    await _settle(app)


@pytest.fixture
async def local_archive(tmp_path: Path) -> AsyncIterator[Simulate]:
    """Archive simulations into a local folder; each call adds one to the same recording."""
    root = tmp_path / "archive"
    settings = Settings(
        _env_file=None,
        auth_tokens=TOKEN,
        store=f"file://{root}",
        spool_dir=str(tmp_path / "spool"),
        segment_target_s=0.5,
        leave_grace_s=0.2,
        log_format="json",
    )
    logs.configure(settings.log_level, settings.log_format)
    app = create_app(settings, LocalFolderStore(root))
    runner = web.AppRunner(app)
    base = await serve_locally(runner)
    url = f"{base.replace('http://', 'ws://', 1)}/ws?token={TOKEN}"
    archived = Archived(f"file://{root}", url=url, app=app)

    async def simulate(**options: Any) -> Archived:
        await _simulate(url, app, archived, **options)
        return archived

    yield simulate
    await runner.cleanup()


@pytest.fixture
async def s3_archive(service: ServiceFactory, s3_endpoint: str) -> Simulate:
    """Archive simulations into the S3 server under `archive/`."""
    running = await service(segment_target_s=0.5)
    archived = Archived(
        f"s3://{running.bucket}/archive", endpoint_url=s3_endpoint, url=running.url, app=running.app
    )

    async def simulate(**options: Any) -> Archived:
        await _simulate(running.url, running.app, archived, **options)
        return archived

    return simulate


SPEAKERS = (100, 101, 102)
SPOKEN_FROM_S = 1.0
SILENT_S = (3.0, 4.5)
"""Participant 101 sends nothing in this range (a mute that sends no chunks)."""


@dataclass
class Talking:
    """Three participants' webcams and voices, the audio on a connection of its own: what
    each one said (16 kHz PCM from `SPOKEN_FROM_S`, with 101's silence as zeros)."""

    archived: Archived
    pcm: dict[int, bytes]


async def talk(simulate: Simulate, seconds: float = 6.0) -> Talking:
    """Archive a meeting of `SPEAKERS` with video, then their audio on a connection of its
    own; the chunks carry no jitter, so each one's place is exactly its timestamp."""
    bot_id, recording_id = str(uuid.uuid4()), str(uuid.uuid4())
    pcm = {p: speaker(p, seconds) for p in SPEAKERS}
    cut = [round((t - SPOKEN_FROM_S) * RATE) * 2 for t in SILENT_S]
    pcm[101] = pcm[101][: cut[0]] + bytes(cut[1] - cut[0]) + pcm[101][cut[1] :]
    sent = [
        item
        for item in meeting_audio(pcm, SPOKEN_FROM_S, jitter_s=0.0)
        if item[0] != 101 or not SILENT_S[0] <= item[1].relative_s < SILENT_S[1]
    ]
    archived = await simulate(
        participants=len(SPEAKERS),
        seconds=seconds,
        fps=10,
        start_relative_s=SPOKEN_FROM_S,
        bot_id=bot_id,
        recording_id=recording_id,
    )
    assert archived.app is not None
    wallclock_start = archived.simulations[-1].wallclock_start
    assert wallclock_start is not None
    await send_audio(archived.url, bot_id, recording_id, sent, wallclock_start)
    await _settle(archived.app)
    return Talking(archived, pcm)


@dataclass
class Viewing:
    """A service with the viewer on, archiving simulations into its own store."""

    http: str
    app: web.Application
    root: Path | None = None
    """The local folder the archive is in, where it is one."""
    simulations: list[Simulation] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return self.http.replace("http://", "ws://") + f"/ws?token={TOKEN}"

    async def settle(self) -> None:
        await _settle(self.app)

    async def archived(self, **options: Any) -> Archived:
        """`simulate` for helpers that take a `Simulate` (such as `talk`)."""
        await self.simulate(**options)
        return Archived("", self.simulations, url=self.ws_url, app=self.app)

    async def simulate(self, **options: Any) -> Simulation:
        if self.simulations:
            options.setdefault("bot_id", self.simulations[0].bot_id)
            options.setdefault("recording_id", self.simulations[0].recording_id)
        archived = Archived("")
        await _simulate(self.ws_url, self.app, archived, **options)
        self.simulations.append(archived.simulations[0])
        return archived.simulations[0]

    def recording_url(self, suffix: str = "", token: str | None = TOKEN) -> str:
        sim = self.simulations[0]
        query = "" if token is None else f"?token={token}"
        return f"{self.http}/recordings/{sim.bot_id}/{sim.recording_id}{suffix}{query}"


@asynccontextmanager
async def _file_viewer(tmp_path: Path, **overrides: Any) -> AsyncIterator[Viewing]:
    settings = Settings(
        _env_file=None,
        auth_tokens=TOKEN,
        store=f"file://{tmp_path / 'archive'}",
        spool_dir=str(tmp_path / "spool"),
        segment_target_s=1.0,
        leave_grace_s=0.2,
        log_format="json",
        viewer=True,
        **overrides,
    )
    logs.configure(settings.log_level, settings.log_format)
    app = create_app(settings)
    runner = web.AppRunner(app)
    yield Viewing(await serve_locally(runner), app, tmp_path / "archive")
    await runner.cleanup()


@pytest.fixture
async def file_viewer(tmp_path: Path) -> AsyncIterator[Viewing]:
    """The service with the viewer on, over a local folder store it opens itself."""
    async with _file_viewer(tmp_path) as viewing:
        yield viewing


@pytest.fixture
async def talking_viewer(tmp_path: Path) -> AsyncIterator[Viewing]:
    """The same with 2 s audio segments, and gaps in a voice over 0.5 s left as gaps (not
    filled with silence): participant 101's pause in `talk` is one, between two segments."""
    async with _file_viewer(tmp_path, audio_segment_s=2.0, audio_gap_fill_s=0.5) as viewing:
        yield viewing


@pytest.fixture
async def s3_viewer(service: ServiceFactory) -> Viewing:
    """The service with the viewer on, over the S3 server (media by presigned URLs)."""
    running = await service(segment_target_s=1.0, viewer=True)
    return Viewing(running.http, running.app)


@dataclass
class Continuation:
    """One participant's webcam with a single key frame (as WebRTC senders send), sent to
    one service, then, once that one has written it out, to a second service with a spool
    of its own on the same store (a reconnect to another ECS task, or a deploy): the second
    continues the stream mid-GOP, behind the first one's init segment."""

    seconds: float = 4.0
    fps: float = 10.0
    first: tuple[int, int] = (0, 20)
    """The frames (by index, end excluded) sent to the first service."""
    then: tuple[int, int] = (20, 40)
    """Those sent to the second; a later start leaves frames out (the bot was away)."""


@dataclass
class Continued(Archived):
    """A continued stream's archive (participant 100's webcam) and what was sent."""

    units: list[tuple[float, bytes]] = field(default_factory=list)
    """Every access unit sent, with its time, in order (also in the simulation's `sent`)."""
    reconnect_s: float = 0.0
    """The time of the first frame the second service got."""

    @property
    def manifest_key(self) -> str:
        return f"{self.stream_prefix(100, 'webcam', 'h264')}/manifest.json"


async def _send_continued(
    continuation: Continuation,
    services: list[tuple[str, web.Application]],
    store_url: str,
    endpoint_url: str | None = None,
) -> Continued:
    sim = Simulation(url=services[0][0], participants=1, seconds=continuation.seconds)
    (stream,) = sim.plan()
    units = list(encode_stream(stream, continuation.seconds, continuation.fps, None))
    assert [frame.keyframe for _, _, frame in units].count(True) == 1
    archived = Continued(store_url, [sim], endpoint_url)
    start = datetime.now(UTC)
    ids = {"bot_id": sim.bot_id, "recording_id": sim.recording_id}
    for (url, app), (first, last) in zip(
        services, (continuation.first, continuation.then), strict=True
    ):
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            for relative, data, frame in units[first:last]:
                message = media_message(data, relative, start, "webcam", 100, **ids)
                await ws.send_str(orjson.dumps(message).decode())
                stream.sent.append(frame)
                archived.units.append((relative, data))
        await _settle(app)
    archived.reconnect_s = units[continuation.then[0]][0]
    return archived


Continue = Callable[..., Awaitable[Continued]]


def picture_md5(image: av.VideoFrame) -> str:
    """The MD5 of a picture's planes, packed (as FFmpeg's `framemd5` muxer hashes them)."""
    return hashlib.md5(image.to_ndarray().tobytes()).hexdigest()  # noqa: S324 (a checksum)


def sent_pictures(units: list[tuple[float, bytes]]) -> list[tuple[float, str]]:
    """What a decoder makes of access units, fed in order: (time, `picture_md5`) each."""
    decoder = av.CodecContext.create("h264", "r")
    pictures = []
    for relative, data in [*units, (0.0, b"")]:
        packet = av.Packet(data) if data else None
        if packet is not None:
            packet.pts = round(relative * 90_000)
            packet.time_base = Fraction(1, 90_000)
        for image in decoder.decode(packet):
            assert isinstance(image, av.VideoFrame)
            assert image.pts is not None
            pictures.append((round(image.pts / 90_000, 6), picture_md5(image)))
    return pictures


async def _local_service(
    tmp_path: Path, root: Path, spool: str, runners: list[web.AppRunner], **overrides: Any
) -> tuple[str, web.Application]:
    values: dict[str, Any] = {
        "auth_tokens": TOKEN,
        "store": f"file://{root}",
        "spool_dir": str(tmp_path / spool),
        "segment_target_s": 0.5,
        "leave_grace_s": 0.2,
        "log_format": "json",
        **overrides,
    }
    settings = Settings(_env_file=None, **values)
    logs.configure(settings.log_level, settings.log_format)
    app = create_app(settings)
    runner = web.AppRunner(app)
    runners.append(runner)
    return await serve_locally(runner), app


def _ws(base: str) -> str:
    return f"{base.replace('http://', 'ws://', 1)}/ws?token={TOKEN}"


@pytest.fixture
async def continued_local(tmp_path: Path) -> AsyncIterator[Continue]:
    """A continued stream (see `Continuation`, whose fields are the factory's options) in a
    local folder store."""
    root = tmp_path / "archive"
    runners: list[web.AppRunner] = []
    services = [await _local_service(tmp_path, root, f"spool-{task}", runners) for task in "ab"]
    urls = [(_ws(base), app) for base, app in services]

    async def make(**options: Any) -> Continued:
        return await _send_continued(Continuation(**options), urls, f"file://{root}")

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def continued_s3(service: ServiceFactory, s3_endpoint: str) -> Continue:
    """A continued stream (see `Continuation`) in the S3 server under `archive/`."""
    first = await service(spool_dir="spool-a", segment_target_s=0.5)
    second = await service(spool_dir="spool-b", segment_target_s=0.5)
    urls = [(first.url, first.app), (second.url, second.app)]
    store_url = f"s3://{first.bucket}/archive"

    async def make(**options: Any) -> Continued:
        return await _send_continued(Continuation(**options), urls, store_url, s3_endpoint)

    return make


ContinueViewing = Callable[..., Awaitable[tuple[Viewing, Continued]]]


@pytest.fixture
async def continued_viewer(tmp_path: Path) -> AsyncIterator[ContinueViewing]:
    """A continued stream (see `Continuation`) in a local folder store, and the viewer of
    the second service (the one that continued it) over that store."""
    root = tmp_path / "archive"
    runners: list[web.AppRunner] = []
    first = await _local_service(tmp_path, root, "spool-a", runners)
    second = await _local_service(tmp_path, root, "spool-b", runners, viewer=True)
    urls = [(_ws(base), app) for base, app in (first, second)]

    async def make(**options: Any) -> tuple[Viewing, Continued]:
        archived = await _send_continued(Continuation(**options), urls, f"file://{root}")
        return Viewing(second[0], second[1], root, list(archived.simulations)), archived

    yield make
    for runner in runners:
        await runner.cleanup()
