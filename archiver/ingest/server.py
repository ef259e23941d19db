"""The HTTP face of the service: `/ws` for bots, `/healthz` and `/readyz` for the platform.

`/healthz` is liveness: the process serves and its event loop turns. Nothing else fails it:
a load balancer or ECS that saw a full or draining task as unhealthy would stop it, and its
disk (the spool) with it. Whether the task takes new bots is admission: `/ws` refuses the
upgrade with 503 while it should not (the bot retries, the load balancer sends it to another
task), and `/readyz` says why, for people and for docker compose.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import structlog
from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractAccessLogger

from archiver import metrics
from archiver.errors import InputError, StoreError, TokenError
from archiver.events.log import AUDIO_EVENTS
from archiver.host.protection import TaskProtection
from archiver.host.workers import Slot
from archiver.ingest.bindings import TokenBindings
from archiver.ingest.messages import parse_message
from archiver.ingest.tokens import TokenCheck
from archiver.layout import RecordingId, StreamId
from archiver.recordings.notices import ReadyNotices
from archiver.settings import Settings
from archiver.store.spool import Spool, SpoolState
from archiver.values import EventMessage, Grant, MediaMessage
from archiver.writers import Writers

log = structlog.get_logger(__name__)

_LEAVE_EVENT = "participant_events.leave"


@dataclass(slots=True)
class ServiceState:
    """What the request handlers share: built once per app."""

    settings: Settings
    spool: Spool
    writers: Writers
    protection: TaskProtection
    tokens: TokenCheck
    notices: ReadyNotices
    bindings: TokenBindings
    slot: Slot | None = None
    ready: bool = True
    connections: int = 0
    next_connection: int = 0
    totals: Counter[str] = field(default_factory=Counter)
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    all_closed: asyncio.Event = field(default_factory=asyncio.Event)
    bots_asked_to_reconnect: bool = False
    drain_deadline: float | None = None
    """When the drain must be over (loop time), from the moment it began."""

    def refusals(self) -> list[str]:
        """Why the task takes no new bots now; empty when it does."""
        reasons = []
        if not self.ready:
            reasons.append("draining")
        if not self.spool.writable:
            reasons.append("spool not writable: " + ", ".join(sorted(self.spool.write_failures)))
        if self.spool.state is SpoolState.full:
            reasons.append("spool full")
        elif self.spool.state is SpoolState.high:
            reasons.append("spool above its high-water mark")
        return reasons


STATE = web.AppKey("state", ServiceState)


class RedactingAccessLogger(AbstractAccessLogger):
    """Access log without query strings: the bot's token travels in one."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        log.info(
            "http_request",
            method=request.method,
            path=request.path,
            status=response.status,
            duration_ms=round(time * 1000, 1),
            remote=request.remote,
        )

    @property
    def enabled(self) -> bool:
        return True


async def healthz(request: web.Request) -> web.Response:
    """Liveness only: answering at all is the check."""
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """Admission: 200 while `/ws` takes new bots, else 503 with the reasons."""
    state = request.app[STATE]
    reasons = state.refusals()
    body = {
        "reasons": reasons,
        "pid": os.getpid(),
        "slot": state.slot.number if state.slot is not None else None,
        "connections": state.connections,
        "spool": state.spool.state.value,
        "spool_pending_bytes": state.spool.pending_bytes,
        "streams": len(state.writers.streams.streams),
        "queued_bytes": state.writers.streams.queued.used,
        "events_logs": len(state.writers.events.logs),
        "events_queued_bytes": state.writers.events.budget.total,
        "session_indexes": len(state.writers.sessions.sessions),
        "store_reachable": state.spool.store_reachable,
        "using_fallback": state.spool.using_fallback,
        "spool_writable": state.spool.writable,
        **state.spool.counters,
        "recordings_waiting": len(state.writers.sessions.waiting),
        "notices": dict(state.notices.counters),
    }
    if reasons:
        return web.json_response({"status": "not ready", **body}, status=503)
    return web.json_response({"status": "ready", **body})


async def websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        grant = state.tokens.verify(request.query.get("token"))
        if grant.kind == "view":
            raise TokenError("wrong_scope")
    except TokenError as error:
        state.totals["refused_unauthorized"] += 1
        state.totals[f"refused_token_{error.reason}"] += 1
        metrics.connection_refused(f"token_{error.reason}")
        log.warning("connection_refused", reason=f"token {error.reason}", remote=request.remote)
        raise web.HTTPUnauthorized(text="missing, wrong or expired token\n") from None
    reasons = state.refusals()
    if reasons:
        # Before the upgrade: the bot retries and the load balancer picks another task.
        state.totals["refused_unavailable"] += 1
        metrics.connection_refused("unavailable")
        raise web.HTTPServiceUnavailable(
            text=f"not accepting connections: {'; '.join(reasons)}\n",
            headers={"Retry-After": "1"},
        )
    ws = web.WebSocketResponse(
        heartbeat=state.settings.heartbeat_s, max_msg_size=state.settings.max_message_bytes
    )
    await ws.prepare(request)
    state.next_connection += 1
    connection = Connection(state, ws, state.next_connection, request.remote, grant)
    state.connections += 1
    metrics.connection_opened()
    state.sockets.add(ws)
    await state.protection.connection_opened()
    try:
        await connection.receive()
    finally:
        state.sockets.discard(ws)
        if not state.sockets:
            state.all_closed.set()
        state.connections -= 1
        metrics.connection_closed()
        await connection.close()
        await state.protection.connection_closed()
    return ws


class Connection:
    """One bot's websocket: parses each message, routes it, counts what it refuses."""

    def __init__(
        self,
        state: ServiceState,
        ws: web.WebSocketResponse,
        number: int,
        remote: str | None,
        grant: Grant,
    ) -> None:
        self.state = state
        self.ws = ws
        self.grant = grant
        self.bot_id = grant.bot_id
        """The one bot this connection writes for (None: any, with a static token; or not
        known until an unbound token's first message binds it)."""
        self.counts: Counter[str] = Counter()
        self.streams: set[StreamId] = set()
        self.queued = state.writers.streams.connection_budget()
        self.event_recordings: set[RecordingId] = set()
        self.opened = time.monotonic()
        self.log = log.bind(connection=number)
        self.log.info("connection_opened", remote=remote)

    async def receive(self) -> None:
        async for message in self.ws:
            if message.type is WSMsgType.TEXT:
                try:
                    await self.handle(message.data)
                except Exception as exc:
                    # A bug of ours met by one message: that message only, never the
                    # connection (the bot's other streams ride on it).
                    self.refuse(InputError("internal_error", repr(exc)))
                    if self.counts["refused_internal_error"] == 1:
                        self.log.exception("message_failed")
            elif message.type is WSMsgType.BINARY:
                self.refuse(InputError("binary_message", "the protocol sends JSON text only"))
            elif message.type is WSMsgType.ERROR:
                self.counts["protocol_error"] += 1
                self.log.warning("connection_error", error=str(self.ws.exception()))

    async def handle(self, text: str) -> None:
        try:
            message = parse_message(text, self.state.settings.audio_codec)
        except InputError as error:
            self.refuse(error)
            return
        recording = (
            message.stream.recording if isinstance(message, MediaMessage) else message.recording
        )
        if recording is not None and not await self.admits(recording.bot_id):
            return
        if isinstance(message, MediaMessage):
            metrics.media_received(message.stream.media_format)
            await self.route_media(message)
        else:
            metrics.message_received(message.event)
            await self.route_event(message)

    async def route_media(self, message: MediaMessage) -> None:
        stream = message.stream
        registry = self.state.writers.streams
        if stream not in self.streams:
            if self._open_streams() >= self.state.settings.max_streams_per_connection:
                # Beyond any meeting platform's limit at once: refuse this stream's frames,
                # never the connection (everyone else on it keeps being archived).
                self.refuse(InputError("too_many_streams", str(stream)))
                return
            self.streams.add(stream)
            registry.attach(stream)
            self.log = self.log.bind(bot=stream.recording.bot_id)
        self.counts[f"media_{stream.media_format}"] += 1
        await registry.dispatch(message, self.queued)

    async def admits(self, bot_id: str) -> bool:
        """Whether this connection's token writes for `bot_id`; a refused message is counted
        (`wrong_bot`), never archived. An unbound token is bound to its first bot here."""
        if self.grant.kind == "static":
            return True
        if self.bot_id is None and self.grant.binding is not None:
            try:
                self.bot_id = await self.state.bindings.bot_of(self.grant.binding, bot_id)
            except StoreError as exc:
                self.refuse(InputError("binding_unavailable", str(exc)))
                return False
        if bot_id != self.bot_id:
            self.refuse(InputError("wrong_bot", f"the token writes for another bot, not {bot_id}"))
            return False
        return True

    def _open_streams(self) -> int:
        """Streams of this connection still open: ended ones (a leave, idle) stop counting.
        Streams no longer running are let go; one still finishing stays attached, since
        frames queued meanwhile continue it and this connection's close must end it."""
        registry = self.state.writers.streams
        gone = {stream for stream in self.streams if not registry.is_running(stream)}
        registry.detach(gone, reason=None)
        self.streams -= gone
        return sum(1 for stream in self.streams if registry.is_open(stream))

    async def route_event(self, message: EventMessage) -> None:
        """Archive the event beside its recording's video (audio is only counted); a leave
        also ends the participant's streams."""
        self.counts["events"] += 1
        recording = message.recording
        if recording is None:
            # No safe ids: nowhere to archive it without trusting the message's text.
            self.refuse(InputError("event_without_recording", message.event))
            return
        events = self.state.writers.events
        if recording not in self.event_recordings:
            limit = self.state.settings.max_event_recordings_per_connection
            if len(self.event_recordings) >= limit and self._let_go_of_quiet() >= limit:
                # A bot sends one recording: refuse this one's events, never the connection.
                self.refuse(InputError("too_many_recordings", recording.prefix))
                return
            self.event_recordings.add(recording)
            events.attach(recording)
        if message.event in AUDIO_EVENTS:
            self.counts["audio_skipped"] += 1
            events.skip_audio(recording)
            return
        events.append(recording, message)
        if message.event == _LEAVE_EVENT and message.participant_id is not None:
            self.state.writers.streams.end_participant(recording, message.participant_id)
        if await events.room(recording):
            # Its closed batches are over their budget: this socket was not read until the
            # spool took them (backpressure, nothing dropped).
            self.counts["events_slowed"] += 1

    def _let_go_of_quiet(self) -> int:
        """Let go of the recordings with nothing open or waiting for the spool (they come
        back if more of their events arrive); return how many this connection still holds."""
        events = self.state.writers.events
        quiet = {recording for recording in self.event_recordings if events.quiet(recording)}
        if quiet:
            events.release(quiet)
            self.event_recordings -= quiet
        return len(self.event_recordings)

    def refuse(self, error: InputError) -> None:
        """Count and log a refused message; the connection goes on."""
        self.counts[f"refused_{error.reason}"] += 1
        self.state.totals[f"refused_{error.reason}"] += 1
        metrics.message_refused(error.reason)
        seen = self.counts[f"refused_{error.reason}"]
        if seen == 1 or seen % 100 == 0:
            self.log.warning("message_refused", reason=error.reason, detail=error.detail, seen=seen)

    async def close(self) -> None:
        self.state.writers.streams.detach(self.streams, "connection_closed")
        self.state.writers.events.release(self.event_recordings)
        self.log.info(
            "connection_closed",
            close_code=self.ws.close_code,
            seconds=round(time.monotonic() - self.opened, 1),
            streams=len(self.streams),
            **self.counts,
        )


def add_routes(app: web.Application) -> None:
    """The bots' and the platform's routes; `archiver.service.app` builds what they share."""
    app.router.add_get("/ws", websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
