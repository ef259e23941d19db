"""Everything that writes behind the websocket, as one: the streams (`StreamRegistry`), the
events archive and the session writer.

The composition root builds them (`archiver.service.app`), the websocket handler feeds
them, and the drain waits for them or stops them together; each keeps its own state.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from archiver.events.archive import EventArchive
from archiver.recordings.sessions import SessionWriter
from archiver.streams.registry import StreamRegistry, cancel_until_done


@dataclass(slots=True)
class Writers:
    streams: StreamRegistry
    events: EventArchive
    sessions: SessionWriter

    async def wait_idle(self) -> None:
        """Wait until every stream's worker and every events log has finished and every
        index is written. Cancelling the wait cancels none of them (`abort` does)."""
        await self.streams.wait_idle()
        await self.events.wait_idle()
        await self.sessions.flush()

    async def close(self) -> None:
        """End every stream and events log, and wait until all is written."""
        self.streams.end_all()
        self.events.end_all()
        await self.wait_idle()
        self.streams.close()

    def tasks(self) -> list[asyncio.Task[Any]]:
        """Every task behind the websocket that has not finished: streams' workers and
        uploads, events logs' writers, index writes."""
        found = [*self.streams.tasks(), *self.events.tasks(), *self.sessions.tasks()]
        return [t for t in found if not t.done()]

    async def abort(self, patience_s: float) -> list[str]:
        """Stop now (a drain past its deadline): no timer starts new work, and every task is
        cancelled, again each time one catches it to clean up (a stream storing its last
        manifest), until all have ended or `patience_s` has passed. What they leave in the
        spool stays there. Returns the names of those still running."""
        self.sessions.stop()
        self.events.stop()
        return await cancel_until_done(self.tasks, patience_s)

    def unfinished(self) -> list[str]:
        """Manifest keys of streams and events logs still being written out."""
        return sorted([*self.streams.unfinished(), *self.events.unfinished()])
