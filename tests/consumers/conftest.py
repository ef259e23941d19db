"""A recording archived by the real service, for the read side to read back: into a local
folder (`local_archive`) or into the S3 server (`s3_archive`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from archiver import logs
from archiver.ingest.server import STATE, create_app
from archiver.settings import Settings
from archiver.simulator import Simulation, run_simulation
from archiver.store import LocalFolderStore
from tests.conftest import TOKEN, ServiceFactory, serve_locally


@dataclass
class Archived:
    """What was sent, and where the archive of it lies."""

    store_url: str
    simulations: list[Simulation] = field(default_factory=list)
    endpoint_url: str | None = None

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


async def _simulate(url: str, app: web.Application, archived: Archived, **options: Any) -> None:
    if archived.simulations:
        options.setdefault("bot_id", archived.bot_id)
        options.setdefault("recording_id", archived.recording_id)
    sim = await run_simulation(Simulation(url=url, **options))
    archived.simulations.append(sim)
    state = app[STATE]
    deadline = time.monotonic() + 30
    while state.connections and time.monotonic() < deadline:  # noqa: ASYNC110 (a counter)
        await asyncio.sleep(0.02)
    await asyncio.wait_for(state.registry.wait_idle(), deadline - time.monotonic())


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
    archived = Archived(f"file://{root}")

    async def simulate(**options: Any) -> Archived:
        await _simulate(url, app, archived, **options)
        return archived

    yield simulate
    await runner.cleanup()


@pytest.fixture
async def s3_archive(service: ServiceFactory, s3_endpoint: str) -> Simulate:
    """Archive simulations into the S3 server under `archive/`."""
    running = await service(segment_target_s=0.5)
    archived = Archived(f"s3://{running.bucket}/archive", endpoint_url=s3_endpoint)

    async def simulate(**options: Any) -> Archived:
        await _simulate(running.url, running.app, archived, **options)
        return archived

    return simulate


@dataclass
class Viewing:
    """A service with the viewer on, archiving simulations into its own store."""

    http: str
    app: web.Application
    simulations: list[Simulation] = field(default_factory=list)

    async def simulate(self, **options: Any) -> Simulation:
        if self.simulations:
            options.setdefault("bot_id", self.simulations[0].bot_id)
            options.setdefault("recording_id", self.simulations[0].recording_id)
        url = self.http.replace("http://", "ws://") + f"/ws?token={TOKEN}"
        archived = Archived("")
        await _simulate(url, self.app, archived, **options)
        self.simulations.append(archived.simulations[0])
        return archived.simulations[0]

    def recording_url(self, suffix: str = "", token: str | None = TOKEN) -> str:
        sim = self.simulations[0]
        query = "" if token is None else f"?token={token}"
        return f"{self.http}/recordings/{sim.bot_id}/{sim.recording_id}{suffix}{query}"


@pytest.fixture
async def file_viewer(tmp_path: Path) -> AsyncIterator[Viewing]:
    """The service with the viewer on, over a local folder store it opens itself."""
    settings = Settings(
        _env_file=None,
        auth_tokens=TOKEN,
        store=f"file://{tmp_path / 'archive'}",
        spool_dir=str(tmp_path / "spool"),
        segment_target_s=1.0,
        leave_grace_s=0.2,
        log_format="json",
        viewer=True,
    )
    logs.configure(settings.log_level, settings.log_format)
    app = create_app(settings)
    runner = web.AppRunner(app)
    yield Viewing(await serve_locally(runner), app)
    await runner.cleanup()


@pytest.fixture
async def s3_viewer(service: ServiceFactory) -> Viewing:
    """The service with the viewer on, over the S3 server (media by presigned URLs)."""
    running = await service(segment_target_s=1.0, viewer=True)
    return Viewing(running.http, running.app)
