"""Bounded queues: the payload bytes a stream, a connection and the process may hold
waiting."""

from __future__ import annotations

import asyncio


class QueuedBytes:
    """Payload bytes waiting in stream queues: one for the process (owned by the registry),
    one per connection within it, so that no client can take the memory of the others."""

    def __init__(self, limit_bytes: int, within: QueuedBytes | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.within = within
        self.used = 0
        self.freed: asyncio.Event = asyncio.Event() if within is None else within.freed
        """Set whenever bytes leave a queue, for feeders waiting for room."""

    def fits(self, size: int) -> bool:
        fits_here = self.used == 0 or self.used + size <= self.limit_bytes
        return fits_here and (self.within is None or self.within.fits(size))

    def add(self, size: int) -> None:
        self.used += size
        if self.within is not None:
            self.within.add(size)

    def free(self, size: int) -> None:
        self.used -= size
        if self.within is not None:
            self.within.free(size)
        else:
            self.freed.set()
