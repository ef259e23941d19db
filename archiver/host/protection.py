"""ECS task scale-in protection while bots are connected, or the spool holds the only copy
of something.

A bot's connection carries a whole meeting and the bot gives up after about 90 s of
failed reconnects, so neither a scale-in nor a deployment should stop a task that holds
one; nor one whose spool holds objects no store has confirmed (a Fargate task's disk goes
with it). The ECS agent's task-protection endpoint marks the task as busy; this module sets
it when the first bot connects or the first hold begins, clears it when the last of both
ends, and re-arms it before it expires meanwhile.

The task's protection is one flag, and several workers share the task: each worker says
what it wants in a shared folder (`SharedWants`, a file per worker), and under a lock on
that folder whichever worker changes its want sends what the task as a whole wants. So the
task is released only when no live worker wants protection; a dead worker's want goes with
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import structlog

log = structlog.get_logger(__name__)

_STATE_PATH = "/task-protection/v1/state"
_MAX_EXPIRES_IN_MINUTES = 2880
_LOCK_POLL_S = 0.01


class SharedWants:
    """What every worker of the task wants, in one folder: a file per worker
    (`<pid>.<member>`, "1" or "0"), and `agent`, what was last sent to the agent."""

    def __init__(self, folder: Path, member: str) -> None:
        self.folder = folder
        self.member = member
        folder.mkdir(parents=True, exist_ok=True)

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Exclusive across the task's workers. Polled rather than blocked on in a thread:
        a cancelled wait must not leave a thread to take the lock later and keep it."""
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(_LOCK_POLL_S)
            yield
        finally:
            os.close(fd)

    def publish(self, wanted: bool) -> tuple[bool, bool]:
        """Record this worker's want; (whether any live worker wants protection, whether it
        was last sent enabled). Wants of workers no longer alive are removed."""
        (self.folder / f"{os.getpid()}.{self.member}").write_text("1" if wanted else "0")
        task_wants = False
        for path in self.folder.glob("[0-9]*.*"):
            if not _alive(int(path.name.split(".", 1)[0])):
                path.unlink(missing_ok=True)
                continue
            with contextlib.suppress(FileNotFoundError):
                task_wants |= path.read_text() == "1"
        agent = self.folder / "agent"
        return task_wants, agent.is_file() and agent.read_text() == "1"

    def sent(self, enabled: bool) -> None:
        (self.folder / "agent").write_text("1" if enabled else "0")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TaskProtection:
    """Counts open bot connections and holds; keeps the task protected while any is open.

    `agent_uri` is the `ECS_AGENT_URI` the ECS agent puts into the container; with None
    (not on ECS) nothing is sent. Agent errors are logged, never raised: losing
    protection must not cost a bot its connection. With `shared`, this worker's want is
    combined with its siblings' before anything is sent.
    """

    def __init__(
        self,
        agent_uri: str | None,
        session: aiohttp.ClientSession | None = None,
        *,
        expires_in_minutes: int = 60,
        refresh_interval_s: float | None = None,
        request_timeout_s: float = 5.0,
        shared: SharedWants | None = None,
    ) -> None:
        if not 1 <= expires_in_minutes <= _MAX_EXPIRES_IN_MINUTES:
            raise ValueError(f"expires_in_minutes must be 1..{_MAX_EXPIRES_IN_MINUTES}")
        expiry_s = expires_in_minutes * 60.0
        if refresh_interval_s is None:
            # Half the expiry leaves room for a failed re-arm to be retried in time.
            refresh_interval_s = expiry_s / 2
        if not 0 < refresh_interval_s < expiry_s:
            raise ValueError("refresh_interval_s must be above 0 and below the expiry")
        self._state_url = agent_uri.rstrip("/") + _STATE_PATH if agent_uri else None
        self._session = session
        self._owns_session = session is None
        self._expires_in_minutes = expires_in_minutes
        self._refresh_interval_s = refresh_interval_s
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._open_connections = 0
        self._holds: set[str] = set()
        self._protected = False
        # Serialises calls to the agent so that they arrive in the order of the changes.
        self._lock = asyncio.Lock()
        self._refresh_task: asyncio.Task[None] | None = None
        self._shared = shared

    async def start(self) -> None:
        """Take part in the task's protection from the start: a worker replacing a dead one
        may be the one to release what the dead one held."""
        if self._shared is not None:
            await self._apply()

    @property
    def open_connections(self) -> int:
        """Bot connections currently counted."""
        return self._open_connections

    async def connection_opened(self) -> None:
        """Count a new bot connection; the first one turns protection on."""
        self._open_connections += 1
        if self._state_url is None or self._open_connections != 1 or self._holds:
            return
        await self._changed()

    async def connection_closed(self) -> None:
        """Count a closed bot connection; the last one turns protection off."""
        if self._open_connections == 0:
            log.warning("task_protection_unbalanced_close")
            return
        self._open_connections -= 1
        if self._state_url is None or self._open_connections != 0 or self._holds:
            return
        await self._changed()

    @property
    def wanted(self) -> bool:
        """Whether the task should be protected now."""
        return self._open_connections > 0 or bool(self._holds)

    async def hold(self, reason: str, held: bool) -> None:
        """Protect the task while `reason` holds (e.g. the spool has unconfirmed objects),
        whether or not bots are connected."""
        before = self.wanted
        if held:
            self._holds.add(reason)
        else:
            self._holds.discard(reason)
        if self._state_url is None or self.wanted == before:
            return
        await self._changed()

    async def _changed(self) -> None:
        if self.wanted and self._refresh_task is None:
            self._refresh_task = asyncio.create_task(self._keep_protected())
        if not self.wanted:
            await self._stop_refresh()
        await self._apply()

    async def close(self) -> None:
        """Stop re-arming and release the HTTP session if this object created it."""
        await self._stop_refresh()
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _keep_protected(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_interval_s)
            await self._apply(refresh=True)

    async def _stop_refresh(self) -> None:
        task, self._refresh_task = self._refresh_task, None
        if task is None:
            return
        task.cancel()
        # wait() rather than awaiting the task: a cancellation of the caller still goes through.
        await asyncio.wait([task])

    async def _apply(self, *, refresh: bool = False) -> None:
        """Send the state the count asks for, unless the agent already has it."""
        if self._state_url is None:
            return
        async with self._lock:
            if self._shared is not None:
                await self._apply_shared(self._state_url, self._shared, refresh)
                return
            wanted = self.wanted
            if wanted == self._protected and not (wanted and refresh):
                return
            if await self._put(self._state_url, wanted):
                self._protected = wanted

    async def _apply_shared(self, state_url: str, shared: SharedWants, refresh: bool) -> None:
        async with shared.locked():
            wanted, sent = await asyncio.to_thread(shared.publish, self.wanted)
            if wanted == sent and not (wanted and refresh):
                return
            if await self._put(state_url, wanted):
                await asyncio.to_thread(shared.sent, wanted)

    async def _put(self, state_url: str, enabled: bool) -> bool:
        body: dict[str, bool | int] = {"ProtectionEnabled": enabled}
        if enabled:
            body["ExpiresInMinutes"] = self._expires_in_minutes
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.put(state_url, json=body, timeout=self._timeout) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.error("task_protection_failed", enabled=enabled, error=repr(exc))
            return False
        if not _accepted(status, text):
            log.error("task_protection_refused", enabled=enabled, status=status, body=text[:500])
            return False
        log.info(
            "task_protection_set",
            enabled=enabled,
            expires_in_minutes=self._expires_in_minutes if enabled else None,
            open_connections=self._open_connections,
            holds=sorted(self._holds),
        )
        return True


def _accepted(status: int, text: str) -> bool:
    """True for the agent's success answer; it sends 200 with a "failure" when ECS refused."""
    if status != 200:
        return False
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return isinstance(payload, dict) and "failure" not in payload and "error" not in payload
