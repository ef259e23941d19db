"""Who may connect: the token check happens before the websocket upgrade."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from archiver.cli import main, serve
from archiver.errors import ConfigError
from archiver.ingest.server import STATE
from archiver.tools.simulator import Simulation, run_simulation
from tests.conftest import TOKEN, ServiceFactory


@pytest.mark.parametrize("query", ["", "?token=", "?token=wrong-token", "?token=test-token"])
async def test_missing_or_wrong_token_is_refused_before_upgrade_and_nothing_is_stored(
    service: ServiceFactory, s3, query: str
) -> None:
    running = await service()
    url = f"ws://127.0.0.1:{running.port}/ws{query}"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url)
    assert refused.value.status == 401
    sim = Simulation(url=url, participants=1, seconds=1)
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await run_simulation(sim)
    await running.settle()
    assert s3.list_objects_v2(Bucket=running.bucket).get("KeyCount", 0) == 0


async def test_any_configured_token_is_accepted_for_rotation(service: ServiceFactory) -> None:
    old = "old-secret-1-5d2e8a0c4f6b1937e0a2"
    running = await service(auth_tokens=f"{old},{TOKEN}")
    for token in (old, TOKEN):
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"ws://127.0.0.1:{running.port}/ws?token={token}")
            assert not ws.closed
            await ws.close()
            assert ws.close_code == 1000
    totals = running.app[STATE].totals
    assert totals["refused_unauthorized"] == 0


async def test_token_appears_in_no_log_line(
    service: ServiceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    running = await service()
    await run_simulation(Simulation(url=running.url, participants=1, seconds=1, fps=10))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await session.ws_connect(f"ws://127.0.0.1:{running.port}/ws?token={TOKEN}x")
        async with session.get(f"{running.http}/healthz?token={TOKEN}") as response:
            assert response.status == 200
    await running.settle()
    await running.runner.cleanup()
    output = capsys.readouterr()
    logged = output.out + output.err
    assert "connection_opened" in logged
    assert "/healthz" in logged
    assert TOKEN not in logged


def test_serve_refuses_to_start_without_a_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"]) == 2
    assert "ARCHIVER_AUTH_TOKENS" in capsys.readouterr().err


def test_serve_refuses_a_static_token_shorter_than_32_characters(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    short = "short-static-1f0c"
    monkeypatch.setenv("ARCHIVER_AUTH_TOKENS", f"{TOKEN},{short}")
    # A spool that cannot be written refuses too, but only once the tokens have passed.
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("ARCHIVER_SPOOL_DIR", str(tmp_path / "not-a-folder"))
    assert main(["serve"]) == 2
    refusal = capsys.readouterr().err
    assert "ARCHIVER_AUTH_TOKENS" in refusal
    assert "32 characters" in refusal
    assert short not in refusal
    assert TOKEN not in refusal
    monkeypatch.setenv("ARCHIVER_AUTH_TOKENS", TOKEN)
    with pytest.raises(ConfigError, match="spool"):
        serve()


async def test_health_and_readiness(service: ServiceFactory) -> None:
    running = await service()
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/readyz"):
            async with session.get(running.http + path) as response:
                assert response.status == 200
