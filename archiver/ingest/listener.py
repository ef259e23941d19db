"""Accepting bots on a port that every worker listens on, so that they spread evenly, and
bounding the connections that are not bots.

The workers share one listening socket. asyncio's own accept loop takes every connection
waiting when it wakes, so a burst of bots (reconnecting after another task drained, say)
would all land on whichever worker woke first; `SO_REUSEPORT` sockets per worker spread by a
hash of addresses instead, blind to load, so a few bots often pile onto one worker. Here
every worker is woken by a waiting connection, waits a moment that grows with the bots it
holds beyond the least busy worker (`WorkerLoads`), then tries to take one: the least busy
worker gets there first and its siblings find nothing. A burst is spread the same way, one
connection at a time. The least busy worker (or a worker alone) never waits: whatever waits
in the queue, idle sockets by the thousand included, it takes at once, so neither
`/healthz` nor a bot waits behind them.

Connections that are not (yet) a bot's websocket are bounded per worker
(`PendingConnections`): in time, a connection that has not sent its first request's headers
within `header_timeout_s` of being accepted is closed (aiohttp's `keepalive_timeout`, given
by the supervisor, closes one idle between requests); in number, beyond
`max_pending_connections` each new connection closes the oldest one still waiting for its
headers (else the oldest idle one) to make room. An idle or slow socket thus holds a
descriptor for seconds, never the worker's last one.
"""

from __future__ import annotations

import asyncio
import errno
import math
import mmap
import os
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)

_PAUSE_PER_BOT_S = 0.005
_PAUSE_MAX_S = 0.1
_OUT_OF_RESOURCES_PAUSE_S = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_SHED_LOG_EVERY_S = 10.0
_EARLY_S = 0.001

_Handle = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def pause_before_accept(bots_held: int, fewest_held: int = 0) -> float:
    """Seconds a worker holding `bots_held` bot connections lets its siblings go first, when
    the least busy worker holds `fewest_held`: none for the least busy one itself."""
    return min(_PAUSE_MAX_S, _PAUSE_PER_BOT_S * max(0, bots_held - fewest_held))


class WorkerLoads:
    """How many bots each worker holds, in memory that all the supervisor's workers share:
    made in the master before the first fork, so every worker, a replacement too, maps the
    same page. One entry per slot (`archiver.host.workers`): the pid publishing there and its
    bots; pid 0 is a vacant slot (its worker is not accepting, or died: the master vacates a
    dead worker's entry). Entries are written and read without a lock: a torn or stale read
    only makes one pause a little off."""

    _ENTRY = struct.Struct("=qq")

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._memory = mmap.mmap(-1, self._ENTRY.size * slots)

    def publish(self, slot: int, bots: int) -> None:
        self._ENTRY.pack_into(self._memory, slot * self._ENTRY.size, os.getpid(), bots)

    def vacate(self, slot: int) -> None:
        self._ENTRY.pack_into(self._memory, slot * self._ENTRY.size, 0, 0)

    def forget(self, pid: int) -> None:
        """Vacate whatever entry `pid` (a worker that exited) published in."""
        for slot, (owner, _) in enumerate(self._ENTRY.iter_unpack(self._memory)):
            if owner == pid:
                self.vacate(slot)

    def fewest(self) -> int | None:
        """The fewest bots any accepting worker holds; None when none publishes."""
        held = [bots for pid, bots in self._ENTRY.iter_unpack(self._memory) if pid]
        return min(held) if held else None


@dataclass(frozen=True, slots=True)
class LoadShare:
    """One worker's entry in `WorkerLoads`."""

    loads: WorkerLoads
    slot: int

    def pause(self, bots_held: int) -> float:
        """Publish this worker's bots; its pause before the next accept."""
        self.loads.publish(self.slot, bots_held)
        fewest = self.loads.fewest()
        return pause_before_accept(bots_held, bots_held if fewest is None else fewest)

    def vacate(self) -> None:
        self.loads.vacate(self.slot)


async def accept_forever(
    listener: socket.socket,
    protocol_factory: Callable[[], asyncio.Protocol],
    bots_held: Callable[[], int],
    *,
    admit: Callable[[], bool] | None = None,
    share: LoadShare | None = None,
) -> None:
    """Take connections from `listener` and hand each to the server's protocol, as
    `loop.create_server` would, until cancelled. `admit` (`PendingConnections.admit`) makes
    room for each, or refuses it (it is closed at once); with `share`, the pause counts
    only the bots this worker holds beyond its least busy sibling."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    try:
        while True:
            await _readable(loop, listener)
            bots = bots_held()
            await asyncio.sleep(share.pause(bots) if share else pause_before_accept(bots))
            try:
                connection, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue  # A sibling took it, or its client gave up.
            except OSError as exc:
                # Out of descriptors or memory (or worse): the waiting connections stay
                # queued in the kernel, or go to a sibling, while this worker lets some go.
                log.warning(
                    "accept_paused",
                    error=str(exc),
                    out_of_resources=exc.errno in _OUT_OF_RESOURCES,
                    pause_s=_OUT_OF_RESOURCES_PAUSE_S,
                )
                await asyncio.sleep(_OUT_OF_RESOURCES_PAUSE_S)
                continue
            if admit is not None and not admit():
                connection.close()
                continue
            try:
                await loop.connect_accepted_socket(protocol_factory, connection)
            except OSError as exc:
                log.warning("accepted_connection_lost", error=str(exc))
                connection.close()
    finally:
        if share is not None:
            share.vacate()


async def _readable(loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
    """Until a connection waits on `listener` (or a sibling is already taking it)."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(listener, wake)
    try:
        await ready
    finally:
        loop.remove_reader(listener)


class PendingConnections:
    """The connections a worker accepted that are not (yet) a bot's websocket: waiting for
    their first request's headers, being answered, or idle between requests (keep-alive).

    aiohttp has no timeout for a request's headers: its `keepalive_timeout` closes a
    connection that waits for its next request, and only recent versions (3.14) start it
    when a connection opens too, with the keep-alive figure; before, a connection that never
    sent a request was held forever. Bytes that arrive do not restart it, so it does bound
    slow headers of a request after the first. The first request's are bounded here: a
    connection whose first request has not reached the app's handler (its headers parsed)
    `header_timeout_s` after it was accepted is closed. One timer serves them all: they are
    kept in the order they were accepted, so only the oldest's deadline is ever armed.

    Their number is capped at `max_pending`: each new connection beyond it closes the
    oldest still waiting for its headers, else the oldest idle one (an idle socket holds its
    place only until something newer needs it), and is itself closed at once only when every
    pending connection is being answered. Refusing new ones while old idle ones stay would let
    a few dozen sockets a second keep `/healthz` and every bot out. Each is counted, and
    logged at most once every ten seconds (`pending_connections_shed`).

    It learns what becomes of each connection from the protocol in front of aiohttp's
    (`protocol`, for `accept_forever`: when it closes) and from a wrapper around the server's
    request handler (when a request begins and ends), never from aiohttp's internals."""

    def __init__(
        self,
        server: web.Server,
        bots_held: Callable[[], int],
        *,
        header_timeout_s: float,
        max_pending: int,
    ) -> None:
        self.server = server
        self.bots_held = bots_held
        self.header_timeout_s = header_timeout_s
        self.max_pending = max_pending
        self.counts: Counter[str] = Counter(
            header_timeouts=0, evicted_waiting=0, evicted_idle=0, refused=0
        )
        self._loop = asyncio.get_running_loop()
        self._open: set[web.RequestHandler] = set()
        self._waiting: dict[web.RequestHandler, float] = {}
        """Accepted, no request yet, oldest first: when each was accepted."""
        self._idle: dict[web.RequestHandler, float] = {}
        """Answered, waiting for their next request, longest idle first."""
        self._deadline: asyncio.TimerHandle | None = None
        self._report: asyncio.TimerHandle | None = None
        self._reported = -math.inf
        self._began = self._loop.time()
        server.request_handler = self._watching(server.request_handler)

    @property
    def pending(self) -> int:
        return max(0, len(self._open) - self.bots_held())

    def protocol(self) -> asyncio.Protocol:
        """A new connection's protocol: the server's, watched."""
        return _Watched(self, self.server())

    def admit(self) -> bool:
        """Make room for one more connection; False when there is none to make."""
        while self.pending >= self.max_pending:
            if self._waiting:
                self._close(next(iter(self._waiting)), "evicted_waiting")
            elif self._idle:
                self._close(next(iter(self._idle)), "evicted_idle")
            else:
                self._count("refused")
                return False
        return True

    def close(self) -> None:
        """Stop the timers (the runner's cleanup); log what is not logged yet."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._report is not None:
            self._report.cancel()
            self._log()

    def _opened(self, handler: web.RequestHandler) -> None:
        self._open.add(handler)
        self._waiting[handler] = self._loop.time()
        self._arm()

    def _forget(self, handler: web.RequestHandler) -> None:
        self._open.discard(handler)
        self._waiting.pop(handler, None)
        self._idle.pop(handler, None)

    def _close(self, handler: web.RequestHandler, reason: str) -> None:
        self._forget(handler)
        handler.force_close()
        self._count(reason)

    def _watching(self, handle: _Handle) -> _Handle:
        async def watched(request: web.BaseRequest) -> web.StreamResponse:
            handler = request.protocol
            self._waiting.pop(handler, None)
            self._idle.pop(handler, None)
            try:
                return await handle(request)
            finally:
                if handler in self._open:
                    self._idle[handler] = self._loop.time()

        return watched

    def _arm(self) -> None:
        if self._deadline is None and self._waiting:
            oldest = next(iter(self._waiting.values()))
            self._deadline = self._loop.call_at(oldest + self.header_timeout_s, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        due = self._loop.time() + _EARLY_S - self.header_timeout_s
        while self._waiting:
            handler, accepted = next(iter(self._waiting.items()))
            if accepted > due:
                break
            self._close(handler, "header_timeouts")
        self._arm()

    def _count(self, reason: str) -> None:
        self.counts[reason] += 1
        if self._report is None:
            wait = max(0.0, self._reported + _SHED_LOG_EVERY_S - self._loop.time())
            self._report = self._loop.call_later(wait, self._log)

    def _log(self) -> None:
        self._report = None
        self._reported = self._loop.time()
        log.warning(
            "pending_connections_shed",
            pending=self.pending,
            max_pending=self.max_pending,
            header_timeout_s=self.header_timeout_s,
            seconds=round(self._reported - self._began, 1),
            **self.counts,
        )


class _Watched(asyncio.Protocol):
    """aiohttp's protocol for one connection, with `PendingConnections` told when it opens
    and closes; everything else goes straight through."""

    __slots__ = ("_gate", "_handler")

    def __init__(self, gate: PendingConnections, handler: web.RequestHandler) -> None:
        self._gate = gate
        self._handler = handler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._gate._opened(self._handler)
        self._handler.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._gate._forget(self._handler)
        self._handler.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        # None today (the transport closes), whatever aiohttp says tomorrow.
        return self._handler.eof_received()  # type: ignore[func-returns-value]

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()
