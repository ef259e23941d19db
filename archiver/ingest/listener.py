"""Accepting bots on a port that every worker listens on, so that they spread evenly.

The workers share one listening socket. asyncio's own accept loop takes every connection
waiting when it wakes, so a burst of bots (reconnecting after another task drained, say)
would all land on whichever worker woke first; `SO_REUSEPORT` sockets per worker spread by a
hash of addresses instead, blind to load, so a few bots often pile onto one worker. Here
every worker is woken by a waiting connection, waits a moment that grows with the bots it
holds, then tries to take one: the least busy worker gets there first and its siblings find
nothing. A burst is spread the same way, one connection at a time.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

_PAUSE_PER_BOT_S = 0.005
_PAUSE_MAX_S = 0.1
_OUT_OF_RESOURCES_PAUSE_S = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def pause_before_accept(bots_held: int) -> float:
    """Seconds a worker holding `bots_held` bot connections lets its siblings go first."""
    return min(_PAUSE_MAX_S, _PAUSE_PER_BOT_S * bots_held)


async def accept_forever(
    listener: socket.socket,
    protocol_factory: Callable[[], asyncio.Protocol],
    bots_held: Callable[[], int],
) -> None:
    """Take connections from `listener` and hand each to the server's protocol, as
    `loop.create_server` would, until cancelled."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    while True:
        await _readable(loop, listener)
        await asyncio.sleep(pause_before_accept(bots_held()))
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            continue  # A sibling took it, or its client gave up.
        except OSError as exc:
            # Out of descriptors or memory (or worse): the waiting connections stay queued
            # in the kernel, or go to a sibling, while this worker lets some go.
            log.warning(
                "accept_paused",
                error=str(exc),
                out_of_resources=exc.errno in _OUT_OF_RESOURCES,
                pause_s=_OUT_OF_RESOURCES_PAUSE_S,
            )
            await asyncio.sleep(_OUT_OF_RESOURCES_PAUSE_S)
            continue
        try:
            await loop.connect_accepted_socket(protocol_factory, connection)
        except OSError as exc:
            log.warning("accepted_connection_lost", error=str(exc))
            connection.close()


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
