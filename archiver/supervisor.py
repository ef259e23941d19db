"""`archiver serve` in production: a gunicorn master that supervises `ARCHIVER_WORKERS`
aiohttp workers (by default one per CPU the container may use) sharing one port.

Each worker listens on a socket of its own bound to the service's port with `SO_REUSEPORT`,
and the kernel spreads new connections over those sockets, so a burst of bots that arrive
together (say, reconnecting after another task drained) lands on every worker; one shared
socket would hand the whole burst to whichever worker woke first. The master only holds the
port, bound but not listening, so it is taken once (a clear error when it is not free, and
port 0 resolved to one port for all); gunicorn's own listener is a Unix socket nobody uses.
A bot's connection stays with the worker that accepted it.

Each worker owns one slot of the spool (`archiver.workers`): its own `objects/` and
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

import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web
from gunicorn import glogging
from gunicorn.app.base import BaseApplication

from archiver import logs, metrics, workers
from archiver.errors import ConfigError
from archiver.ingest.server import DrainingAppRunner, RedactingAccessLogger, create_app
from archiver.settings import Settings

_WORKER_CLASS = "aiohttp.GunicornWebWorker"
_GRACE_MARGIN_S = 5.0


class Supervisor(BaseApplication):  # type: ignore[misc]
    """gunicorn configured from our settings, not from its own command line or files."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.exporter = metrics.Exporter(settings, multiprocess_folder=True)
        self.held_port = _hold_port(settings.host, settings.port)
        self.port: int = self.held_port.getsockname()[1]
        self.unused_listener = Path(tempfile.mkdtemp(prefix="archiver-master-"))
        super().__init__()

    def load_config(self) -> None:
        settings = self.settings
        options: dict[str, Any] = {
            "bind": [f"unix:{self.unused_listener / 'unused.sock'}"],
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
            "post_worker_init": self._listen_on_own_socket,
            "child_exit": lambda arbiter, worker: self.exporter.process_exited(worker.pid),
            "on_exit": self._exit,
        }
        for name, value in options.items():
            self.cfg.set(name, value)

    def _listen_on_own_socket(self, worker: Any) -> None:
        """In the worker, before it serves: its own socket on the port replaces the master's
        Unix one (aiohttp starts listening on it once the app has started)."""
        worker.sockets = [_port_socket(self.settings.host, self.port)]

    def _exit(self, arbiter: Any) -> None:
        self.exporter.stop()
        self.held_port.close()
        shutil.rmtree(self.unused_listener, ignore_errors=True)

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
                access_log_class=RedactingAccessLogger,
                shutdown_timeout=settings.drain_deadline_s,
            )

        return runner


def _port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port` that shares the port with the workers' sockets."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _hold_port(host: str, port: int) -> socket.socket:
    """The port, bound for the master's lifetime but not listening (so it takes no
    connections): a port in use fails here, clearly, and port 0 becomes one real port."""
    try:
        return _port_socket(host, port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} (ARCHIVER_PORT): {exc}") from exc


def _logger_class(settings: Settings) -> type[glogging.Logger]:
    """gunicorn's own lines (worker started, worker died) as our JSON lines on stdout."""

    class StructuredLogger(glogging.Logger):  # type: ignore[misc]
        def setup(self, cfg: Any) -> None:
            logs.configure(settings.log_level, settings.log_format, pid=True)
            self.error_log.handlers.clear()
            self.error_log.propagate = True
            self.access_log.disabled = True

    return StructuredLogger
