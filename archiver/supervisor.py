"""`archiver serve` in production: a gunicorn master that supervises one aiohttp worker.

If the worker dies (a crash, the kernel's OOM killer, SIGKILL), the master starts a new one
on the same machine, and the new one recovers the spool and journals the old one left.
SIGTERM to the master drains the worker (1012 to every bot, streams flushed, spool
uploaded) within the drain deadline, then both exit. One worker per machine: the spool
has one owner; scale out by adding machines.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from gunicorn import glogging
from gunicorn.app.base import BaseApplication

from archiver import logs
from archiver.ingest.server import DrainingAppRunner, RedactingAccessLogger, create_app
from archiver.settings import Settings

_WORKER_CLASS = "aiohttp.GunicornWebWorker"
_GRACE_MARGIN_S = 5.0


class Supervisor(BaseApplication):  # type: ignore[misc]
    """gunicorn configured from our settings, not from its own command line or files."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        settings = self.settings
        options: dict[str, Any] = {
            "bind": [f"{settings.host}:{settings.port}"],
            "workers": 1,
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
        }
        for name, value in options.items():
            self.cfg.set(name, value)

    def load(self) -> Any:
        settings = self.settings

        async def runner() -> web.AppRunner:
            return DrainingAppRunner(
                create_app(settings),
                access_log_class=RedactingAccessLogger,
                shutdown_timeout=settings.drain_deadline_s,
            )

        return runner


def _logger_class(settings: Settings) -> type[glogging.Logger]:
    """gunicorn's own lines (worker started, worker died) as our JSON lines on stdout."""

    class StructuredLogger(glogging.Logger):  # type: ignore[misc]
        def setup(self, cfg: Any) -> None:
            logs.configure(settings.log_level, settings.log_format)
            self.error_log.handlers.clear()
            self.error_log.propagate = True
            self.access_log.disabled = True

    return StructuredLogger
