"""The HTTP face of the service: `/ws` for bots, `/healthz` and `/readyz` for the platform.

`/healthz` is liveness: the process serves and its event loop turns. Nothing else fails it:
a load balancer or ECS that saw a full or draining task as unhealthy would stop it, and its
disk (the spool) with it. Whether the task takes new bots is admission: `/ws` refuses the
upgrade with 503 while it should not (the bot retries, the load balancer sends it to another
task), and `/readyz` says why, for people and for docker compose.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.abc import AbstractAccessLogger

from archiver import metrics
from archiver.consumers.viewer import ViewerConfig, add_viewer, find_hls_js
from archiver.errors import ConfigError, InputError, StoreError, TokenError
from archiver.events import AUDIO_EVENTS
from archiver.ingest.bindings import TokenBindings
from archiver.ingest.listener import LoadShare, PendingConnections, accept_forever
from archiver.ingest.messages import parse_message
from archiver.ingest.tokens import TokenCheck
from archiver.layout import RecordingId, StreamId
from archiver.notices import ReadyNotices
from archiver.protection import SharedWants, TaskProtection
from archiver.reconcile import primary_answers, reconcile
from archiver.recovery import Recovery, merge_documents, recover
from archiver.sessions import read_waiting
from archiver.settings import Settings
from archiver.store import ListingStore, ObjectStore, open_fallback_store, open_store
from archiver.store.spool import Spool, SpoolState
from archiver.streams import StreamRegistry, cancel_until_done
from archiver.values import EventMessage, Grant, MediaMessage
from archiver.workers import Slot

log = structlog.get_logger(__name__)

_PROTECTION_CHECK_S = 1.0
_EMPTY_CHECKS_BEFORE_RELEASE = 3
_LEAVE_EVENT = "participant_events.leave"


@dataclass(slots=True)
class ServiceState:
    """What the request handlers share: built once per app."""

    settings: Settings
    spool: Spool
    registry: StreamRegistry
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
        "streams": len(state.registry.streams),
        "queued_bytes": state.registry.queued.used,
        "events_logs": len(state.registry.events.logs),
        "events_queued_bytes": state.registry.events.budget.total,
        "session_indexes": len(state.registry.sessions.sessions),
        "store_reachable": state.spool.store_reachable,
        "using_fallback": state.spool.using_fallback,
        "spool_writable": state.spool.writable,
        **state.spool.counters,
        "recordings_waiting": len(state.registry.sessions.waiting),
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
        self.queued = state.registry.connection_budget()
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
            message = parse_message(text)
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
        registry = self.state.registry
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
        registry = self.state.registry
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
        events = self.state.registry.events
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
            self.state.registry.end_participant(recording, message.participant_id)
        if await events.room(recording):
            # Its closed batches are over their budget: this socket was not read until the
            # spool took them (backpressure, nothing dropped).
            self.counts["events_slowed"] += 1

    def _let_go_of_quiet(self) -> int:
        """Let go of the recordings with nothing open or waiting for the spool (they come
        back if more of their events arrive); return how many this connection still holds."""
        events = self.state.registry.events
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
        self.state.registry.detach(self.streams, "connection_closed")
        self.state.registry.events.release(self.event_recordings)
        self.log.info(
            "connection_closed",
            close_code=self.ws.close_code,
            seconds=round(time.monotonic() - self.opened, 1),
            streams=len(self.streams),
            **self.counts,
        )


def create_app(
    settings: Settings, store: ObjectStore | None = None, slot: Slot | None = None
) -> web.Application:
    """The service as an aiohttp app; it opens the store and worker threads on start-up.
    Under the supervisor, `slot` is the worker's claim on its part of the spool
    (`settings.spool_dir` is then the slot's folder) and the orphaned parts it adopted."""
    tokens = _token_check(settings)
    if settings.webhook_url and settings.webhook_secret is None:
        raise ConfigError(
            "ARCHIVER_WEBHOOK_URL needs ARCHIVER_WEBHOOK_SECRET, the key its notices are "
            "signed with (e.g. ARCHIVER_WEBHOOK_SECRET=$(openssl rand -hex 32))"
        )
    app = web.Application(client_max_size=1024**2)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if settings.viewer:
        add_viewer(
            app,
            ViewerConfig(
                store_url=settings.store,
                endpoint_url=settings.s3_endpoint_url,
                grant=tokens.grant,
                hls_js=find_hls_js(settings.viewer_hls_js_path),
                url_expiry_s=settings.viewer_url_expiry_s,
            ),
        )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        active_store = store if store is not None else open_store(settings)
        fallback = open_fallback_store(settings)
        spool = Spool(
            settings.spool_dir,
            active_store,
            cap_bytes=settings.spool_cap_bytes,
            high_water_ratio=settings.spool_high_water_ratio,
            backoff_s=settings.upload_backoff_s,
            concurrency=settings.upload_concurrency,
            fallback=fallback,
            fallback_after_s=settings.fallback_after_s,
            merge_documents=merge_documents,
        )
        adopted = slot.adopted if slot is not None else []
        left_waiting = await asyncio.to_thread(
            lambda: [
                *read_waiting(Path(settings.spool_dir)),
                *(r for folder in adopted for r in read_waiting(folder, take=True)),
            ]
        )
        recovery = await recover(
            spool, Path(settings.spool_dir), settings.segment_target_s, adopted
        )
        executor = ThreadPoolExecutor(
            max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="segment"
        )
        notices = ReadyNotices(settings, active_store)
        registry = StreamRegistry(settings, spool, executor, recovery, notices)
        registry.sessions.wait_again(left_waiting)
        shared = (
            SharedWants(slot.folder.parent / "protection", str(slot.number))
            if slot is not None and settings.ecs_agent_uri
            else None
        )
        protection = TaskProtection(settings.ecs_agent_uri, shared=shared)
        await protection.start()
        # Under the supervisor the master serves every worker's metrics; alone, this process.
        exporter = metrics.Exporter(settings, multiprocess_folder=False)
        if slot is None:
            exporter.start()
        bindings = TokenBindings(spool)
        app[STATE] = ServiceState(
            settings, spool, registry, protection, tokens, notices, bindings, slot
        )
        if settings.auth_tokens:
            log.warning(
                "static_tokens_accepted",
                detail="a static token writes for any bot and opens every recording: for "
                "local use; give bots signed tokens (ARCHIVER_TOKEN_KEYS, archiver token "
                "create --bot)",
            )
        background = [asyncio.create_task(_protect_while_spooled(spool, protection))]
        if fallback is not None:
            background.append(
                asyncio.create_task(
                    _reconcile_forever(spool, fallback, settings.reconcile_interval_s)
                )
            )
        log.info(
            "service_started",
            store=_describe_store(settings.store),
            fallback_store=_describe_store(settings.fallback_store or ""),
        )
        yield
        state = app[STATE]
        state.ready = False
        deadline = state.drain_deadline or loop.time() + settings.drain_deadline_s
        await _drain(settings, spool, registry, recovery, notices, deadline)
        for task in background:
            task.cancel()
        await asyncio.wait(background)
        await protection.hold("spool", spool.holds_only_copies)
        # Every task that could use the segmenting threads has ended: none is left waiting
        # on a pool that is gone.
        await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        await notices.close()
        await protection.close()
        await asyncio.to_thread(exporter.stop)
        if fallback is not None:
            await fallback.close()
        if store is None:
            await active_store.close()
        log.info("service_stopped", **app[STATE].totals)

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(_ask_bots_to_reconnect)
    return app


_ABORT_PATIENCE_S = 2.0
"""How long a drain past its deadline waits for the pipeline's tasks to unwind once
cancelled (the supervisor's grace beyond the deadline is 5 s)."""

MIN_STATIC_TOKEN_LENGTH = 32
"""Shortest static token `serve` accepts: a guessable one would let anyone write."""


def _token_check(settings: Settings) -> TokenCheck:
    """Static tokens, signing keys, or both; neither, or a static token too short to be
    secret, refuses to start."""
    if not settings.auth_tokens and not settings.token_keys:
        raise ConfigError(
            "no auth token configured: set ARCHIVER_AUTH_TOKENS to one or more "
            "comma-separated secrets (e.g. ARCHIVER_AUTH_TOKENS=$(openssl rand -hex 24)), "
            "or ARCHIVER_TOKEN_KEYS to signing keys for `archiver token create`"
        )
    short = sum(len(t.get_secret_value()) < MIN_STATIC_TOKEN_LENGTH for t in settings.auth_tokens)
    if short:
        # How many, never which: no part of a token leaves the process.
        raise ConfigError(
            f"{short} of the {len(settings.auth_tokens)} ARCHIVER_AUTH_TOKENS tokens "
            f"{'is' if short == 1 else 'are'} shorter than {MIN_STATIC_TOKEN_LENGTH} "
            "characters: every static token needs at least that many (e.g. "
            "ARCHIVER_AUTH_TOKENS=$(openssl rand -hex 24))"
        )
    return TokenCheck.build(
        [t.get_secret_value() for t in settings.auth_tokens],
        [k.get_secret_value() for k in settings.token_keys],
    )


async def _drain(
    settings: Settings,
    spool: Spool,
    registry: StreamRegistry,
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
            await registry.close()
            if recovery.uploads is not None:
                await asyncio.wait([recovery.uploads])
    except TimeoutError:
        passed = True
    finally:
        evacuate.cancel()
    if passed:
        unfinished = registry.unfinished()
        tasks = [recovery.uploads] if recovery.uploads is not None else []
        outlived = await registry.abort(_ABORT_PATIENCE_S)
        outlived += await cancel_until_done(
            lambda: [t for t in tasks if not t.done()], _ABORT_PATIENCE_S
        )
        left = spool.waiting_keys()
        log.error(
            "drain_deadline_passed",
            unfinished_streams=unfinished,
            left_in_spool=len(left),
            left_in_spool_keys=left,
            fallback_in_use=spool.using_fallback,
            tasks_outlived=outlived,
        )
        return
    # Notices under way get one more attempt's time, within the deadline; what is left
    # keeps its claim for another task to take over.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(min(deadline, loop.time() + settings.webhook_timeout_s)):
            await notices.wait()


async def _protect_while_spooled(spool: Spool, protection: TaskProtection) -> None:
    """Keep the task protected while its spool holds the only copy of anything; released
    only after it has held nothing for a few checks in a row, so a busy spool that empties
    for an instant does not flap the agent."""
    empty_checks = 0
    while True:
        if spool.holds_only_copies:
            empty_checks = 0
            await protection.hold("spool", True)
        else:
            empty_checks += 1
            if empty_checks >= _EMPTY_CHECKS_BEFORE_RELEASE:
                await protection.hold("spool", False)
        await asyncio.sleep(_PROTECTION_CHECK_S)


async def _reconcile_forever(spool: Spool, fallback: ListingStore, interval_s: float) -> None:
    """Whenever the primary answers: send uploads there again, and move what the fallback
    holds (from this task or any other) into it."""
    while True:
        try:
            if await primary_answers(spool.store):
                spool.primary_reachable()
                report = await reconcile(spool.store, fallback)
                if report.moved or report.left:
                    log.warning(
                        "fallback_reconciled",
                        moved_objects=report.moved_objects,
                        moved_bytes=report.moved_bytes,
                        merged_documents=report.merged_documents,
                        left=len(report.left),
                        seconds=report.seconds,
                    )
                if report.moved and not report.left:
                    continue  # More may have arrived meanwhile: look again at once.
        except StoreError as exc:
            log.warning("reconcile_failed", error=str(exc))
        except Exception:
            log.exception("reconcile_failed")
        await asyncio.sleep(interval_s)


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
            await _ask_bots_to_reconnect(self.app)
        await super().cleanup()


async def _ask_bots_to_reconnect(app: web.Application) -> None:
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
    state.registry.sessions.drain()
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


def _describe_store(url: str) -> str:
    return url.split("?", 1)[0]
