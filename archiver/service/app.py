"""The composition root: builds the service from its settings (stores, spool, recovery,
the writers behind the websocket, notices, task protection, the viewer), runs its
background loops, and takes it apart again through the drain (`archiver.service.shutdown`).
Nothing else knows how the whole is wired.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog
from aiohttp import web

from archiver import metrics
from archiver.consumers.viewer import ViewerConfig, add_viewer, find_hls_js
from archiver.documents.merging import merge_documents
from archiver.errors import ConfigError, StoreError
from archiver.events.archive import EventArchive
from archiver.host.memory import share_arenas
from archiver.host.protection import SharedWants, TaskProtection
from archiver.host.workers import Slot
from archiver.ingest.bindings import TokenBindings
from archiver.ingest.server import STATE, ServiceState, add_routes
from archiver.ingest.tokens import TokenCheck
from archiver.layout import SpoolFolders
from archiver.recordings.notices import ReadyNotices
from archiver.recordings.sessions import SessionWriter, read_waiting
from archiver.recovery.replay import recover
from archiver.service.shutdown import ask_bots_to_reconnect, drain
from archiver.settings import Settings
from archiver.store import ListingStore, ObjectStore, open_fallback_store, open_store
from archiver.store.reconcile import primary_answers, reconcile
from archiver.store.spool import Spool
from archiver.streams.registry import StreamRegistry
from archiver.writers import Writers

log = structlog.get_logger(__name__)

_PROTECTION_CHECK_S = 1.0
_EMPTY_CHECKS_BEFORE_RELEASE = 3


def create_app(
    settings: Settings,
    store: ObjectStore | None = None,
    slot: Slot | None = None,
    segmenting: ThreadPoolExecutor | None = None,
) -> web.Application:
    """The service as an aiohttp app; it opens the store and worker threads on start-up.
    Under the supervisor, `slot` is the worker's claim on its part of the spool
    (`settings.spool_dir` is then the slot's folder) and the orphaned parts it adopted.
    `segmenting`: the threads the streams' batches run on (by default, one per CPU and
    four more); the app shuts it down when it stops."""
    tokens = _token_check(settings)
    if settings.webhook_url and settings.webhook_secret is None:
        raise ConfigError(
            "ARCHIVER_WEBHOOK_URL needs ARCHIVER_WEBHOOK_SECRET, the key its notices are "
            "signed with (e.g. ARCHIVER_WEBHOOK_SECRET=$(openssl rand -hex 32))"
        )
    app = web.Application(client_max_size=1024**2)
    add_routes(app)
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
        share_arenas(settings.malloc_arenas)  # before the thread pools start
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
        executor = segmenting or ThreadPoolExecutor(
            max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="segment"
        )
        notices = ReadyNotices(settings, active_store)
        waiting = SpoolFolders(Path(settings.spool_dir)).waiting if notices is not None else None
        sessions = SessionWriter(spool, settings, notices, waiting)
        sessions.wait_again(left_waiting)
        writers = Writers(
            StreamRegistry(settings, spool, executor, recovery, sessions),
            EventArchive(settings, spool, sessions, recovery),
            sessions,
        )
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
            settings, spool, writers, protection, tokens, notices, bindings, slot
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
        await drain(settings, spool, writers, recovery, notices, deadline)
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
    app.on_shutdown.append(ask_bots_to_reconnect)
    return app


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


def _describe_store(url: str) -> str:
    return url.split("?", 1)[0]
