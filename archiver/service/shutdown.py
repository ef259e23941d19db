"""Shutdown, written down: the runner that asks every bot to reconnect elsewhere before
aiohttp's own shutdown, and the drain that flushes streams and the spool within its
deadline, then stops whatever the deadline leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from aiohttp import WSCloseCode, WSMsgType, web

from archiver.ingest.listener import LoadShare, PendingConnections, accept_forever
from archiver.ingest.server import STATE
from archiver.recordings.notices import ReadyNotices
from archiver.recovery.spooling import Recovery
from archiver.settings import Settings
from archiver.store.spool import Spool
from archiver.streams.registry import cancel_until_done
from archiver.writers import Writers

log = structlog.get_logger(__name__)


class DrainingAppRunner(web.AppRunner):
    """The runner to serve the app with: bots are asked to reconnect, and read until they
    reply, before aiohttp's own shutdown begins. From then on aiohttp ignores whatever
    arrives on every connection, websockets included, so frames still on the wire would be
    lost and the bot would see 1006."""

    def __init__(
        self,
        app: web.Application,
        listeners: Sequence[socket.socket] = (),
        share: LoadShare | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self.listeners = listeners
        """Listening sockets this runner accepts on itself (`archiver.ingest.listener`)."""
        self.share = share
        """This worker's entry among the loads of its siblings on those sockets."""
        self.pending: PendingConnections | None = None
        """The connections it accepted there that are not bots' websockets: bounded in time
        (`header_timeout_s`) and number (`max_pending_connections`)."""
        self._accepting: list[asyncio.Task[None]] = []

    async def setup(self) -> None:
        await super().setup()
        server = self.server
        assert server is not None
        if not self.listeners:
            return
        factory: Callable[[], asyncio.Protocol] = server
        admit = None
        if STATE in self.app:  # The app's start-up has run: its settings are there.
            settings = self.app[STATE].settings
            self.pending = PendingConnections(
                server,
                self._bots_held,
                header_timeout_s=settings.header_timeout_s,
                max_pending=settings.max_pending_connections,
            )
            factory, admit = self.pending.protocol, self.pending.admit
        for listener in self.listeners:
            accepting = accept_forever(
                listener, factory, self._bots_held, admit=admit, share=self.share
            )
            self._accepting.append(asyncio.create_task(accepting))

    def _bots_held(self) -> int:
        return self.app[STATE].connections if STATE in self.app else 0

    async def cleanup(self) -> None:
        for task in self._accepting:
            task.cancel()
        await asyncio.gather(*self._accepting, return_exceptions=True)
        if self.pending is not None:
            self.pending.close()
        if STATE in self.app:
            await ask_bots_to_reconnect(self.app)
        await super().cleanup()


async def ask_bots_to_reconnect(app: web.Application) -> None:
    """Shutdown, first step: stop being ready and send every bot a close frame with 1012
    (service restart), so each bot reconnects to another instance while this one drains. A
    bot may send until it has seen that frame (RFC 6455): its connection keeps being read
    and archived until its close reply arrives, within `close_reply_timeout_s`; only then
    is it closed from this side."""
    state = app[STATE]
    state.ready = False
    if state.drain_deadline is None:
        state.drain_deadline = asyncio.get_running_loop().time() + state.settings.drain_deadline_s
    # Before the bots leave: recordings their reconnects continue elsewhere must not be
    # completed here.
    state.writers.sessions.drain()
    if state.bots_asked_to_reconnect:
        return
    state.bots_asked_to_reconnect = True
    sockets = list(state.sockets)
    log.info("draining", connections=len(sockets))
    frame = struct.pack("!H", WSCloseCode.SERVICE_RESTART) + b"service restart"
    await asyncio.gather(
        *(ws.send_frame(frame, WSMsgType.CLOSE) for ws in sockets), return_exceptions=True
    )
    if state.sockets:
        state.all_closed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(state.settings.close_reply_timeout_s):
                await state.all_closed.wait()
    late = list(state.sockets)
    if late:
        log.warning("close_reply_missing", connections=len(late))
    await asyncio.gather(
        *(ws.close(code=WSCloseCode.SERVICE_RESTART, message=b"service restart") for ws in late),
        return_exceptions=True,
    )


_ABORT_PATIENCE_S = 2.0
"""How long a drain past its deadline waits for the pipeline's tasks to unwind once
cancelled (the supervisor's grace beyond the deadline is 10 s)."""
_EVACUATION_PATIENCE_S = 1.5
"""Then, with a fallback store, how long what is left in the spool has to get there."""


async def drain(
    settings: Settings,
    spool: Spool,
    writers: Writers,
    recovery: Recovery,
    notices: ReadyNotices,
    deadline: float,
) -> None:
    """Flush every stream and empty the spool by `deadline` (loop time). Nothing may stay on
    a disk that goes with the task: with a fallback store, what the primary has not taken by
    half the drain (at once, when it is unreachable now) goes to the fallback. Past the
    deadline the pipeline is stopped, every task of it ended, and what it leaves in the
    spool named in one log line."""
    loop = asyncio.get_running_loop()
    evacuate = loop.call_at(
        deadline - settings.drain_deadline_s / 2, spool.use_fallback, "drain half over", True
    )
    if not spool.store_reachable:
        spool.use_fallback("draining while the primary store is unreachable", pin=True)
    passed = False
    try:
        async with asyncio.timeout_at(deadline):
            await writers.close()
            if recovery.uploads is not None:
                await asyncio.wait([recovery.uploads])
    except TimeoutError:
        passed = True
    finally:
        evacuate.cancel()
    if passed:
        unfinished = writers.unfinished()
        tasks = [recovery.uploads] if recovery.uploads is not None else []
        outlived = await writers.abort(_ABORT_PATIENCE_S)
        outlived += await cancel_until_done(
            lambda: [t for t in tasks if not t.done()], _ABORT_PATIENCE_S
        )
        evacuated = await spool.evacuate(_EVACUATION_PATIENCE_S)
        left = spool.waiting_keys()
        log.error(
            "drain_deadline_passed",
            unfinished_streams=unfinished,
            left_in_spool=len(left),
            left_in_spool_keys=left,
            fallback_in_use=spool.using_fallback,
            evacuated_to_fallback=evacuated,
            tasks_outlived=outlived,
        )
        return
    # Notices under way get one more attempt's time, within the deadline; what is left
    # keeps its claim for another task to take over.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(min(deadline, loop.time() + settings.webhook_timeout_s)):
            await notices.wait()
