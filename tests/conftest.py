"""Shared fixtures: a real S3-compatible server (moto in server mode) and the real service."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest
from aiohttp import web
from moto.server import ThreadedMotoServer

from archiver import logs
from archiver.ingest.server import STATE, RedactingAccessLogger
from archiver.service.app import create_app
from archiver.service.shutdown import DrainingAppRunner
from archiver.settings import Settings
from archiver.store import S3Store

TOKEN = "test-token-7f3a9c1e5b2d8046a1c9e3f7"

SLOW_FAMILIES = {
    "faults": "processes",
    "readme": "processes",
    "deploy": "deploy",
    "benchmarks": "benchmark",
    "test_viewer_browser.py": "browser",
}
"""Test folders (or files) whose tests are slow by nature, and the marker each gets; every
one of them is also marked `slow`, which plain `pytest` leaves out."""


SERVICE_FIXTURES = {"service", "s3_endpoint"}
"""Fixtures that start the service in this process or the S3 server: a test that uses one is
marked `service`, which plain `pytest` leaves out too (`-m "not slow"` runs it)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent
    for item in items:
        parts = item.path.relative_to(tests).parts
        family = SLOW_FAMILIES.get(parts[0]) or SLOW_FAMILIES.get(parts[-1])
        if family is not None:
            item.add_marker(family)
            item.add_marker("slow")
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker("service")


async def serve_locally(runner: web.AppRunner) -> str:
    """Set `runner` up on a free port of 127.0.0.1 and return its base URL; the caller
    cleans the runner up."""
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: Any) -> None:
    """No real credentials or ARCHIVER_* settings of the machine leak into a test."""
    import os

    for name in list(os.environ):
        if name.startswith(("AWS_", "ARCHIVER_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"archive-{uuid.uuid4().hex[:12]}"
    client(s3_endpoint).create_bucket(Bucket=name)
    return name


def client(endpoint: str) -> Any:
    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).client("s3", endpoint_url=endpoint)


@pytest.fixture
def s3(s3_endpoint: str) -> Any:
    return client(s3_endpoint)


@dataclass
class RunningService:
    """The service on a loopback port, with its store and settings."""

    app: web.Application
    runner: web.AppRunner
    port: int
    settings: Settings
    store: S3Store
    bucket: str

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?token={TOKEN}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def settle(self, timeout_s: float = 30.0) -> None:
        """Wait until every connection has closed and every stream is written out."""
        state = self.app[STATE]
        deadline = time.monotonic() + timeout_s
        while state.connections and time.monotonic() < deadline:  # noqa: ASYNC110 (a counter)
            await asyncio.sleep(0.02)
        await asyncio.wait_for(state.writers.wait_idle(), deadline - time.monotonic())

    def object_keys(self) -> list[str]:
        """Every object key in the bucket, read straight from the S3 server."""
        assert self.settings.s3_endpoint_url is not None
        pages = client(self.settings.s3_endpoint_url).get_paginator("list_objects_v2")
        return [
            obj["Key"]
            for page in pages.paginate(Bucket=self.bucket)
            for obj in page.get("Contents", [])
        ]

    async def json(self, key: str) -> dict[str, Any]:
        raw = await self.store.get(key)
        assert raw is not None, f"no object {key}"
        parsed: dict[str, Any] = orjson.loads(raw)
        return parsed


ServiceFactory = Callable[..., Awaitable[RunningService]]


@pytest.fixture
async def service(s3_endpoint: str, bucket: str) -> AsyncIterator[ServiceFactory]:
    """Start the real service against the S3 server; settings may be overridden per test."""
    runners: list[web.AppRunner] = []

    async def start(
        store_class: type[S3Store] = S3Store,
        segmenting: ThreadPoolExecutor | None = None,
        **overrides: Any,
    ) -> RunningService:
        """Seams: `store_class`, a store that misbehaves (an `S3Store` subclass);
        `segmenting`, the threads the streams' batches run on."""
        values: dict[str, Any] = {
            "auth_tokens": TOKEN,
            "store": f"s3://{bucket}/archive",
            "s3_endpoint_url": s3_endpoint,
            "segment_target_s": 2.0,
            "leave_grace_s": 0.2,
            "upload_attempts": 2,
            "log_format": "json",
            **overrides,
        }
        settings = Settings(_env_file=None, **values)
        logs.configure(settings.log_level, settings.log_format)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        store = store_class(bucket, "archive", endpoint_url=s3_endpoint, attempts=2)
        app = create_app(settings, store, segmenting=segmenting)
        runner = DrainingAppRunner(app, access_log_class=RedactingAccessLogger)
        await serve_locally(runner)
        runners.append(runner)
        port = runner.addresses[0][1]
        return RunningService(app, runner, port, settings, store, bucket)

    yield start
    for runner in runners:
        await runner.cleanup()
