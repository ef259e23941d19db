"""Fault injection against real processes: the service under its supervisor, and an S3
server that can be stopped and started again on the same port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from moto.server import ThreadedMotoServer

from archiver.store import S3Store
from tests.conftest import TOKEN, client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RestartableS3:
    """moto in server mode; its data lives in this process, so it survives a restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        assert self.server is not None
        self.server.stop()
        self.server = None


@pytest.fixture
def outage_s3() -> Iterator[RestartableS3]:
    s3 = RestartableS3()
    s3.start()
    yield s3
    if s3.server is not None:
        s3.stop()


class ServiceProcess:
    """`archiver serve` as a real process tree: the supervisor and its workers (one unless
    the test asks for `workers`)."""

    def __init__(
        self,
        workdir: Path,
        endpoint: str,
        bucket: str,
        open_files: int | None = None,
        **settings: Any,
    ) -> None:
        self.port = free_port()
        self.open_files = open_files
        """`ulimit -n` for the process tree (Fargate's is 1024); None keeps this one's."""
        self.workdir = workdir
        self.env = {
            **os.environ,
            "ARCHIVER_AUTH_TOKENS": TOKEN,
            "ARCHIVER_STORE": f"s3://{bucket}/archive",
            "ARCHIVER_S3_ENDPOINT_URL": endpoint,
            "ARCHIVER_HOST": "127.0.0.1",
            "ARCHIVER_PORT": str(self.port),
            "ARCHIVER_LOG_FORMAT": "json",
            "ARCHIVER_UPLOAD_ATTEMPTS": "1",
            "ARCHIVER_UPLOAD_BACKOFF_S": "0.1",
            "ARCHIVER_LEAVE_GRACE_S": "0.2",
            "ARCHIVER_WORKERS": "1",
            **{f"ARCHIVER_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.process: asyncio.subprocess.Process | None = None
        self.log_path = workdir / "service.log"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?token={TOKEN}"

    def _command(self) -> list[str]:
        """`archiver serve`, behind a limit on open files when the test sets one. The limit
        is set by a small interpreter that then execs the service: a `preexec_fn` would run
        Python in a forked copy of this threaded test process, which can deadlock."""
        serve = [sys.executable, "-m", "archiver", "serve"]
        if self.open_files is None:
            return serve
        limit = (
            "import os, resource, sys; "
            "n = int(sys.argv[1]); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
            "os.execv(sys.argv[2], sys.argv[2:])"
        )
        return [sys.executable, "-c", limit, str(self.open_files), *serve]

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self._command(),
                env=self.env,
                cwd=self.workdir,
                stdout=log,
                stderr=log,
            )
        await self.wait_healthy()

    async def wait_healthy(self, timeout_s: float = 20) -> None:
        async with asyncio.timeout(timeout_s), aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{self.port}/healthz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)

    async def readyz(self) -> int:
        return (await self.readiness())[0]

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/readyz"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status, await response.json()

    def slot(self, number: int = 0) -> Path:
        """The spool folder of worker slot `number` (the only one with one worker)."""
        return self.workdir / "spool" / f"worker-{number}"

    def worker_pids(self) -> list[int]:
        """The supervisor's children: its workers, live or being replaced."""
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]

    def worker_pid(self) -> int:
        pids = self.worker_pids()
        assert len(pids) == 1, pids
        return pids[0]

    async def wait_for_workers(self, count: int, timeout_s: float = 30) -> list[int]:
        """Wait until `count` workers have claimed their slot and answer; their pids."""
        async with asyncio.timeout(timeout_s):
            while True:
                claimed = {
                    line["pid"] for line in self.logs() if line["event"] == "service_started"
                }
                pids = self.worker_pids()
                if len(pids) == count and claimed >= set(pids):
                    await self.wait_healthy()
                    return pids
                await asyncio.sleep(0.05)

    def worker_rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.worker_pid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def worker_open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.worker_pid()}/fd"))

    def logs(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text().splitlines()
        return [orjson.loads(line) for line in lines if line.startswith("{")]

    async def stop(self) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        assert self.process.returncode is not None
        return self.process.returncode


class ServiceProcesses:
    """Starts service processes against one bucket; stops them all at the end."""

    def __init__(self, s3: RestartableS3, workdir: Path) -> None:
        self.s3 = s3
        self.workdir = workdir
        self.bucket = f"archive-{uuid.uuid4().hex[:12]}"
        client(s3.endpoint).create_bucket(Bucket=self.bucket)
        self.store = S3Store(self.bucket, "archive", endpoint_url=s3.endpoint, attempts=2)
        self.started: list[ServiceProcess] = []

    async def start(
        self, open_files: int | None = None, task: str | None = None, **settings: Any
    ) -> ServiceProcess:
        """One more process on the bucket; `task` gives it a folder (and spool) of its own,
        as a separate ECS task has."""
        workdir = self.workdir
        if task is not None:
            workdir = self.workdir / task
            workdir.mkdir(exist_ok=True)
        process = ServiceProcess(
            workdir, self.s3.endpoint, self.bucket, open_files=open_files, **settings
        )
        await process.start()
        self.started.append(process)
        return process


@pytest.fixture
async def services(outage_s3: RestartableS3, tmp_path: Path) -> AsyncIterator[ServiceProcesses]:
    processes = ServiceProcesses(outage_s3, tmp_path)
    yield processes
    for process in processes.started:
        await process.stop()
    await processes.store.close()
