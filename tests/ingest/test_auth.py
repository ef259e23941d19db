"""Who may connect: the token check happens before the websocket upgrade."""

from __future__ import annotations

import aiohttp
import pytest

from archiver.cli import main
from archiver.simulator import Simulation, run_simulation
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
    running = await service(auth_tokens=f"old-secret-1,{TOKEN}")
    for token in ("old-secret-1", TOKEN):
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"ws://127.0.0.1:{running.port}/ws?token={token}")
            await ws.close()


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


async def test_health_and_readiness(service: ServiceFactory) -> None:
    running = await service()
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/readyz"):
            async with session.get(running.http + path) as response:
                assert response.status == 200
