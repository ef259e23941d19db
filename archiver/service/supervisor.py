"""`archiver serve` in production: a gunicorn master that supervises `ARCHIVER_WORKERS`
aiohttp workers (by default one per CPU the container may use) sharing one port.

All workers accept on gunicorn's one listening socket, each through
`archiver.ingest.listener`: one connection at a time, then a pause that grows with the bots
the worker holds beyond its least busy sibling (their counts in a page of memory the master
maps before the first fork), so bots spread over the workers even when they arrive in a
burst. A bot's connection stays with the worker that accepted it. Connections that are not
bots are closed when their headers are late, when idle, and beyond a cap per worker.

Each worker owns one slot of the spool (`archiver.host.workers`): its own `objects/` and
`journal/` under `spool_dir/worker-<n>/`, held by a file lock for its lifetime, and a share
of the spool cap. If a worker dies (a crash, the kernel's OOM killer,
SIGKILL), the master starts a new one on the same machine; the kernel released the dead
one's lock, so the new one claims exactly that slot and recovers what it left, while its
siblings go on with their own. SIGTERM to the master drains every worker (1012 to every
bot, streams flushed, spool uploaded) within the drain deadline, then all exit.

The master also serves the metrics of every worker together (`archiver.metrics`): it makes
the run's metrics folder before the first fork, serves `/metrics` on its own port and
writes the CloudWatch documents, and marks each dead worker's figures as such.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.worker import GunicornWebWorker
from gunicorn import glogging
from gunicorn.app.base import BaseApplication

from archiver import logs, metrics
from archiver.host import workers
from archiver.ingest.listener import LoadShare, WorkerLoads
from archiver.ingest.server import RedactingAccessLogger
from archiver.service.app import create_app
from archiver.service.shutdown import DrainingAppRunner
from archiver.settings import Settings

_GRACE_MARGIN_S = 10.0


class Worker(GunicornWebWorker):
    """aiohttp's gunicorn worker, except that SIGTERM is handled in Python, not through the
    event loop. The loop learns of a signal from a byte in its self-pipe, which thread-pool
    results share: a loop busy enough for them to fill it (thousands of uploads finishing)
    drops the signal, and the worker would never drain; the master would kill it at the
    grace timeout. The flag set here is read by the worker's main loop every second, and a
    full self-pipe is no longer reported as an error on stderr."""

    def init_signals(self) -> None:
        super().init_signals()
        self.loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self.handle_exit)
        signal.siginterrupt(signal.SIGTERM, False)
        wakeup = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(wakeup, warn_on_full_buffer=False)


_WORKER_CLASS = f"{__name__}.Worker"


class Supervisor(BaseApplication):  # type: ignore[misc]
    """gunicorn configured from our settings, not from its own command line or files."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.exporter = metrics.Exporter(settings, multiprocess_folder=True)
        self.listeners: list[socket.socket] = []
        # Before the first fork: every worker, and every replacement, maps the same page.
        self.loads = WorkerLoads(settings.workers)
        super().__init__()

    def load_config(self) -> None:
        settings = self.settings
        options: dict[str, Any] = {
            "bind": [f"{settings.host}:{settings.port}"],
            "workers": settings.workers,
            "worker_class": _WORKER_CLASS,
            # The worker gets the whole drain deadline; the master kills it only after.
            "graceful_timeout": int(settings.drain_deadline_s + _GRACE_MARGIN_S),
            "timeout": 30,
            "accesslog": None,
            # No runtime control socket: nothing to manage, and the root filesystem may be
            # read-only.
            "control_socket_disable": True,
            "loglevel": settings.log_level,
            "logger_class": _logger_class(settings),
            "when_ready": lambda arbiter: self.exporter.start(),
            "post_fork": lambda arbiter, worker: self.exporter.forked(),
            "post_worker_init": self._accept_ourselves,
            "child_exit": self._worker_exited,
            "on_exit": lambda arbiter: self.exporter.stop(),
        }
        for name, value in options.items():
            self.cfg.set(name, value)

    def _worker_exited(self, arbiter: Any, worker: Any) -> None:
        self.exporter.process_exited(worker.pid)
        self.loads.forget(worker.pid)

    def _accept_ourselves(self, worker: Any) -> None:
        """In the worker, before it serves: its runner accepts on the shared socket itself
        (one bot at a time, the busiest last) instead of aiohttp's greedy accept loop."""
        self.listeners = [listener.sock for listener in worker.sockets]
        worker.sockets = []

    def load(self) -> Any:
        settings = self.settings

        async def runner() -> web.AppRunner:
            # Runs in the worker process, after the fork: the slot's lock is this process's.
            slot = await workers.claim(Path(settings.spool_dir), settings.workers)
            own = settings.model_copy(
                update={
                    "spool_dir": str(slot.folder),
                    "spool_cap_bytes": settings.spool_cap_bytes // settings.workers,
                }
            )
            return DrainingAppRunner(
                create_app(own, slot=slot),
                listeners=self.listeners,
                share=LoadShare(self.loads, slot.number),
                # Between requests; a connection's first request has `header_timeout_s`.
                keepalive_timeout=settings.idle_http_timeout_s,
                access_log_class=RedactingAccessLogger,
                shutdown_timeout=settings.drain_deadline_s,
            )

        return runner


def _logger_class(settings: Settings) -> type[glogging.Logger]:
    """gunicorn's own lines (worker started, worker died) as our JSON lines on stdout."""

    class StructuredLogger(glogging.Logger):  # type: ignore[misc]
        def setup(self, cfg: Any) -> None:
            logs.configure(settings.log_level, settings.log_format, pid=True)
            self.error_log.handlers.clear()
            self.error_log.propagate = True
            self.access_log.disabled = True

    return StructuredLogger
