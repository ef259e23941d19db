"""Giving freed memory back to the system after streams end.

A stream's muxers and decoders allocate their buffers in C; when a burst of streams ends,
the C library keeps what they freed for reuse, so a worker that once held 200 streams
would keep their memory for good. `malloc_trim` returns it (glibc only; elsewhere this
does nothing). Called when streams are let go, at most once per interval, on a thread.

glibc also gives each thread that allocates a heap ("arena") of its own, up to eight per
CPU; a worker's thread pools touch many, each keeps some of a burst's memory that no trim
returns whole, and the worker grows a few MB with every burst of streams until every arena
is warm. `share_arenas` caps their number, as `MALLOC_ARENA_MAX` would: with two, memory
after a second burst of 1,280 streams is where the first left it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import time
from collections.abc import Callable

_TRIM_INTERVAL_S = 5.0
_M_ARENA_MAX = -8
"""glibc's `mallopt` parameter for the most arenas (malloc.h)."""


def _libc_function(name: str) -> Callable[..., int] | None:
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        function: Callable[..., int] = getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None
    return function


def _load_trim() -> Callable[[int], int] | None:
    return _libc_function("malloc_trim")


def share_arenas(count: int) -> bool:
    """Let the process's threads share at most `count` glibc arenas (0 leaves glibc's
    default); call before the thread pools start. Whether it took effect (False without
    glibc)."""
    if count <= 0:
        return False
    mallopt = _libc_function("mallopt")
    return mallopt is not None and mallopt(_M_ARENA_MAX, count) == 1


class FreedMemory:
    """Hands freed C memory back to the system, rate-limited; owned by the registry."""

    def __init__(self, interval_s: float = _TRIM_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._trim = _load_trim()
        self._last = 0.0
        self._task: asyncio.Task[None] | None = None

    def release_soon(self) -> None:
        """Trim once the interval since the last trim has passed (no-op without glibc)."""
        if self._trim is None or (self._task is not None and not self._task.done()):
            return
        delay = max(0.0, self._last + self.interval_s - time.monotonic())
        self._task = asyncio.create_task(self._release_after(delay))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def tasks(self) -> list[asyncio.Task[None]]:
        return [] if self._task is None else [self._task]

    async def _release_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        trim = self._trim
        assert trim is not None
        await asyncio.to_thread(trim, 0)
        self._last = time.monotonic()
