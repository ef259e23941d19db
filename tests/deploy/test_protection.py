"""TaskProtection against a real HTTP server standing in for the ECS agent."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from structlog.testing import LogCapture

from archiver.host import protection
from archiver.host.protection import SharedWants, TaskProtection
from tests.conftest import serve_locally

_PROTECTION_ANSWER = {
    "protection": {
        "ExpirationDate": "2030-01-01T00:00:00Z",
        "ProtectionEnabled": True,
        "TaskArn": "arn:aws:ecs:eu-west-1:123456789012:task/archiver/0123456789abcdef",
    }
}


@dataclass
class FakeAgent:
    """Records every PUT to the task-protection path; answers what `status`/`answer` say."""

    uri: str = ""
    puts: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    answer: dict[str, Any] = field(default_factory=lambda: dict(_PROTECTION_ANSWER))
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def handle(self, request: web.Request) -> web.Response:
        async with self.changed:
            self.puts.append(await request.json())
            self.changed.notify_all()
        return web.json_response(self.answer, status=self.status)

    async def wait_for_puts(self, count: int) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: len(self.puts) >= count), 5)


@pytest.fixture
async def agent() -> AsyncIterator[FakeAgent]:
    fake = FakeAgent()
    app = web.Application()
    app.router.add_put("/task-protection/v1/state", fake.handle)
    runner = web.AppRunner(app)
    fake.uri = await serve_locally(runner)
    yield fake
    await runner.cleanup()


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> LogCapture:
    """The module's log lines, whatever structlog configuration other tests left behind."""
    capture = LogCapture()
    monkeypatch.setattr(protection, "log", structlog.wrap_logger(None, processors=[capture]))
    return capture


def _enable(minutes: int) -> dict[str, Any]:
    return {"ProtectionEnabled": True, "ExpiresInMinutes": minutes}


_DISABLE = {"ProtectionEnabled": False}


async def test_first_connection_protects_and_last_one_releases(agent: FakeAgent) -> None:
    guard = TaskProtection(agent.uri, expires_in_minutes=30)
    await guard.connection_opened()
    await guard.connection_opened()
    await guard.connection_closed()
    assert agent.puts == [_enable(30)]
    await guard.connection_closed()
    assert agent.puts == [_enable(30), _DISABLE]
    assert guard.open_connections == 0
    await guard.close()


async def test_protection_is_rearmed_while_connections_stay(agent: FakeAgent) -> None:
    guard = TaskProtection(agent.uri, expires_in_minutes=1, refresh_interval_s=0.02)
    await guard.connection_opened()
    await agent.wait_for_puts(4)
    await guard.connection_closed()
    settled = len(agent.puts)
    await asyncio.sleep(0.1)
    assert agent.puts[:4] == [_enable(1)] * 4
    assert agent.puts[-1] == _DISABLE
    assert len(agent.puts) == settled, "re-arming went on after the last connection closed"
    await guard.close()


async def test_close_stops_rearming(agent: FakeAgent) -> None:
    guard = TaskProtection(agent.uri, expires_in_minutes=1, refresh_interval_s=0.02)
    await guard.connection_opened()
    await agent.wait_for_puts(2)
    await guard.close()
    settled = len(agent.puts)
    await asyncio.sleep(0.1)
    assert len(agent.puts) == settled


async def test_no_agent_uri_sends_nothing_but_still_counts() -> None:
    guard = TaskProtection(None, refresh_interval_s=0.01)
    await guard.connection_opened()
    assert guard.open_connections == 1
    await asyncio.sleep(0.05)
    await guard.connection_closed()
    assert guard.open_connections == 0
    await guard.close()


async def test_agent_error_is_logged_not_raised_and_retried(
    agent: FakeAgent, logged: LogCapture
) -> None:
    agent.status = 500
    agent.answer = {"error": {"Code": "ServerException", "Message": "agent unavailable"}}
    guard = TaskProtection(agent.uri, expires_in_minutes=1, refresh_interval_s=0.02)
    await guard.connection_opened()
    assert [e["event"] for e in logged.entries] == ["task_protection_refused"]
    assert logged.entries[0]["status"] == 500
    assert logged.entries[0]["log_level"] == "error"

    agent.status = 200
    agent.answer = dict(_PROTECTION_ANSWER)
    await agent.wait_for_puts(2)
    await guard.connection_closed()
    assert agent.puts[:2] == [_enable(1), _enable(1)]
    assert agent.puts[-1] == _DISABLE
    await guard.close()


async def test_failure_answered_with_200_counts_as_refused(
    agent: FakeAgent, logged: LogCapture
) -> None:
    agent.answer = {"failure": {"Arn": "arn:aws:ecs:task", "Reason": "TASK_NOT_VALID"}}
    guard = TaskProtection(agent.uri)
    await guard.connection_opened()
    assert logged.entries[-1]["event"] == "task_protection_refused"
    assert "TASK_NOT_VALID" in logged.entries[-1]["body"]
    await guard.close()


async def test_unreachable_agent_is_logged_not_raised(logged: LogCapture) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    async with aiohttp.ClientSession() as session:
        guard = TaskProtection(f"http://127.0.0.1:{closed_port}", session, request_timeout_s=1)
        await guard.connection_opened()
        await guard.connection_closed()
        await guard.close()
        assert not session.closed, "a session handed in belongs to the caller"
    assert [e["event"] for e in logged.entries] == ["task_protection_failed"]


async def test_unbalanced_close_is_ignored(agent: FakeAgent, logged: LogCapture) -> None:
    guard = TaskProtection(agent.uri)
    await guard.connection_closed()
    assert guard.open_connections == 0
    assert agent.puts == []
    assert logged.entries[0]["event"] == "task_protection_unbalanced_close"
    await guard.close()


async def test_racing_open_and_close_end_released(agent: FakeAgent) -> None:
    guard = TaskProtection(agent.uri)
    for _ in range(5):
        await asyncio.gather(guard.connection_opened(), guard.connection_closed())
    await asyncio.gather(*(guard.connection_opened() for _ in range(3)))
    await asyncio.gather(*(guard.connection_closed() for _ in range(3)))
    assert guard.open_connections == 0
    assert agent.puts[-1] == _DISABLE
    # Each change reached the agent in order: never two of the same state in a row.
    states = [put["ProtectionEnabled"] for put in agent.puts]
    assert all(a != b for a, b in itertools.pairwise(states))
    await guard.close()


@pytest.mark.parametrize(("minutes", "refresh_s"), [(0, None), (2881, None), (1, 60.0), (1, 0.0)])
def test_rejects_expiry_the_agent_would_refuse(minutes: int, refresh_s: float | None) -> None:
    with pytest.raises(ValueError, match="must be"):
        TaskProtection(
            "http://127.0.0.1:1", expires_in_minutes=minutes, refresh_interval_s=refresh_s
        )


async def test_a_spool_hold_protects_without_bots_and_outlasts_them(agent: FakeAgent) -> None:
    guard = TaskProtection(agent.uri)
    await guard.hold("spool", True)
    assert agent.puts == [_enable(60)]
    await guard.connection_opened()
    await guard.connection_closed()
    # The last bot left, but the spool still holds the only copy of something.
    assert agent.puts == [_enable(60)]
    await guard.hold("spool", True)
    await guard.hold("spool", False)
    assert agent.puts == [_enable(60), _DISABLE]
    await guard.close()


async def test_workers_sharing_a_task_release_it_only_when_none_wants_it(
    agent: FakeAgent, tmp_path: Path
) -> None:
    first, second = (
        TaskProtection(agent.uri, shared=SharedWants(tmp_path, str(n))) for n in range(2)
    )
    await first.connection_opened()
    await second.connection_opened()
    await first.connection_closed()  # the second worker still holds a bot
    await agent.wait_for_puts(1)
    await second.connection_closed()
    await agent.wait_for_puts(2)
    assert agent.puts == [_enable(60), _DISABLE]
    for guard in (first, second):
        await guard.close()


async def test_a_dead_workers_protection_is_released_by_its_replacement(
    agent: FakeAgent, tmp_path: Path
) -> None:
    dead = TaskProtection(agent.uri, shared=SharedWants(tmp_path, "0"))
    await dead.connection_opened()
    await agent.wait_for_puts(1)
    await dead.close()
    # Its want outlives it on disk, under a pid no process has.
    (tmp_path / f"{os.getpid()}.0").rename(tmp_path / "4194305.0")
    replacement = TaskProtection(agent.uri, shared=SharedWants(tmp_path, "0"))
    await replacement.start()
    await agent.wait_for_puts(2)
    assert agent.puts == [_enable(60), _DISABLE]
    await replacement.close()
