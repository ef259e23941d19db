"""Workers sharing one listening socket: the least busy one takes each new connection."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter

from archiver.ingest.listener import accept_forever, pause_before_accept


class Hangup(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class Worker(threading.Thread):
    """An event loop of its own accepting on the shared socket, as a worker process does."""

    def __init__(self, name: str, listener: socket.socket, bots: int, took: Counter[str]):
        super().__init__(daemon=True)
        self.name, self.listener, self.bots, self.took = name, listener, bots, took
        self.loop = asyncio.new_event_loop()
        self.task: asyncio.Task[None] | None = None

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.task = self.loop.create_task(
            accept_forever(self.listener, self.protocol, lambda: self.bots)
        )
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        finally:
            self.loop.close()

    def protocol(self) -> asyncio.Protocol:
        self.took[self.name] += 1
        return Hangup()

    def stop(self) -> None:
        assert self.task is not None
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.join(timeout=5)


def test_the_least_busy_worker_takes_each_new_connection() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    took: Counter[str] = Counter()
    workers = [Worker("busy", listener, 12, took), Worker("idle", listener, 0, took)]
    for worker in workers:
        worker.start()
    clients = []
    try:
        for _ in range(10):
            clients.append(socket.create_connection(listener.getsockname()))
            while sum(took.values()) < len(clients):
                threading.Event().wait(0.01)
    finally:
        for worker in workers:
            worker.stop()
        for client in clients:
            client.close()
        listener.close()
    assert took == {"idle": 10}


def test_the_pause_grows_with_the_bots_held_and_is_bounded() -> None:
    assert pause_before_accept(0) == 0
    assert 0 < pause_before_accept(1) < pause_before_accept(8)
    assert pause_before_accept(10_000) == pause_before_accept(100_000) <= 0.1
