"""Connections that are not bots, bounded per worker: late headers are closed, the cap
makes room by closing the oldest, and the pause before an accept counts only the bots a
worker holds beyond its least busy sibling."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from archiver.ingest.listener import (
    LoadShare,
    PendingConnections,
    WorkerLoads,
    accept_forever,
    pause_before_accept,
)
from tests.ingest.test_listener import Worker

HEADER_TIMEOUT_S = 0.5
CAP = 4


class SharingWorker(Worker):
    """`tests.ingest.test_listener`'s worker, with its entry among its siblings' loads."""

    def __init__(
        self, name: str, listener: socket.socket, bots: int, took: Counter[str], share: LoadShare
    ) -> None:
        super().__init__(name, listener, bots, took)
        self.share = share

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.task = self.loop.create_task(
            accept_forever(self.listener, self.protocol, lambda: self.bots, share=self.share)
        )
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        finally:
            self.loop.close()


class Service:
    """An aiohttp server accepting through `accept_forever`, as a worker does: `/healthz`
    answers at once, `/slow` when `release` is set; `bots` stands for the bots it holds."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.bots = 0
        self.server = web.Server(self.handle)
        self.pending = PendingConnections(
            self.server, lambda: self.bots, header_timeout_s=HEADER_TIMEOUT_S, max_pending=CAP
        )
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.task = asyncio.create_task(
            accept_forever(
                self.listener, self.pending.protocol, lambda: self.bots, admit=self.pending.admit
            )
        )

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/slow":
            await self.release.wait()
        return web.Response(text="ok")

    async def connect(self, send: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(send)
        await writer.drain()
        return reader, writer

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.pending.close()
        await self.server.shutdown(0.1)
        self.listener.close()


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    running = Service()
    yield running
    await running.close()


async def closed_within(reader: asyncio.StreamReader, timeout_s: float) -> bool:
    """Whether the server closes the connection (EOF or reset) within `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def get(service: Service, path: str = "/healthz") -> bytes:
    reader, writer = await service.connect(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    try:
        async with asyncio.timeout(2):
            return await reader.read()
    finally:
        writer.close()


async def test_late_headers_are_closed_and_the_cap_makes_room(service: Service) -> None:
    with capture_logs() as logs:
        began = time.monotonic()
        idle = [await service.connect() for _ in range(CAP)]
        slow = [await service.connect(b"GET /heal") for _ in range(CAP)]
        await asyncio.sleep(0.05)
        # Beyond the cap: each of the slow ones closed one of the oldest, the idle ones.
        for reader, _ in idle:
            assert await closed_within(reader, 0.2)
        assert service.pending.counts["evicted_waiting"] == CAP
        # A health check still gets in (closing one slow one), and is answered.
        assert (await get(service)).startswith(b"HTTP/1.1 200")
        # The slow ones left: closed at their header deadline, not before.
        for reader, _ in slow[1:]:
            assert await closed_within(reader, HEADER_TIMEOUT_S + 0.3)
        assert time.monotonic() - began >= HEADER_TIMEOUT_S
        assert service.pending.counts["header_timeouts"] == CAP - 1
        assert service.pending.pending == 0
        for _, writer in idle + slow:
            writer.close()
        await asyncio.sleep(0.05)
    shed = [line for line in logs if line["event"] == "pending_connections_shed"]
    assert len(shed) == 1  # At once; the rest waits its ten seconds.
    assert shed[0]["evicted_waiting"] >= 1


async def test_idle_connections_make_room_and_busy_ones_refuse_newcomers(
    service: Service,
) -> None:
    # CAP keep-alive connections, each answered once, then idle.
    idle = []
    for _ in range(CAP):
        reader, writer = await service.connect(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"ok")
        idle.append((reader, writer))
    assert service.pending.pending == CAP
    assert (await get(service)).startswith(b"HTTP/1.1 200")
    assert await closed_within(idle[0][0], 0.2)
    assert service.pending.counts["evicted_idle"] == 1
    for _, writer in idle:
        writer.close()
    await asyncio.sleep(0.05)

    # CAP requests being answered: none may be closed, so the newcomer is.
    busy = [await service.connect(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(CAP)]
    await asyncio.sleep(0.05)
    reader, writer = await service.connect()
    assert await closed_within(reader, 0.5)
    writer.close()
    assert service.pending.counts["refused"] == 1
    service.release.set()
    for reader, writer in busy:
        assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
        writer.close()


async def test_bots_do_not_count_as_pending(service: Service) -> None:
    """Bots' websockets are not capped: a connection that became one no longer counts."""
    held = [await service.connect(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(CAP)]
    await asyncio.sleep(0.05)
    service.bots = CAP  # They stand for upgraded bots now.
    assert service.pending.pending == 0
    assert (await get(service)).startswith(b"HTTP/1.1 200")
    assert not service.pending.counts["refused"]
    service.release.set()
    for _, writer in held:
        writer.close()


def test_the_pause_counts_only_the_bots_beyond_the_least_busy_worker() -> None:
    loads = WorkerLoads(3)
    busy, idle = LoadShare(loads, 0), LoadShare(loads, 1)
    assert busy.pause(20) == 0  # Alone: nobody to let go first.
    idle.loads.publish(1, 0)
    assert busy.pause(20) == pause_before_accept(20) == 0.1
    idle.loads.publish(1, 18)
    assert busy.pause(20) == pause_before_accept(2)
    assert idle.pause(18) == 0
    loads.forget(os.getpid())  # Both "died" (one pid here): no entry is left.
    assert loads.fewest() is None
    idle.loads.publish(1, 3)
    idle.vacate()
    assert loads.fewest() is None


def test_a_busy_worker_alone_drains_a_queue_of_connections_at_once() -> None:
    """200 connections waiting behind a worker holding 20 bots: with no sibling less busy,
    it waits for nobody (before: 0.1 s each, 20 s for the lot)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    took: Counter[str] = Counter()
    share = LoadShare(WorkerLoads(1), 0)
    worker = SharingWorker("busy", listener, 20, took, share)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(200)]
    began = time.monotonic()
    worker.start()
    try:
        while took["busy"] < len(clients) and time.monotonic() - began < 10:
            threading.Event().wait(0.01)
        seconds = time.monotonic() - began
    finally:
        worker.stop()
        for client in clients:
            client.close()
        listener.close()
    assert took["busy"] == 200
    assert seconds < 1.0, seconds
