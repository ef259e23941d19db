"""Short-lived signed tokens: accepted while genuine and unexpired, refused before the
upgrade otherwise, rotated by key order, and never written to a log."""

from __future__ import annotations

import re
import time

import aiohttp
import pytest

from archiver.cli import main
from archiver.errors import ConfigError, TokenError
from archiver.ingest.server import STATE
from archiver.ingest.tokens import TokenCheck, create_token, ingest_grant, key_id, view_grant
from archiver.service.app import create_app
from archiver.settings import Settings
from archiver.tools.simulator import Simulation, run_simulation
from tests.conftest import TOKEN, RunningService, ServiceFactory
from tests.faults.conftest import free_port
from tests.faults.test_metrics import scrape, total

KEY = "k1-" + "a" * 40
OLD_KEY = "k0-" + "b" * 40
OTHER_KEY = "kx-" + "c" * 40


def ws_url(running: RunningService, token: str) -> str:
    return f"ws://127.0.0.1:{running.port}/ws?token={token}"


async def refused(url: str) -> int:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as error:
            await session.ws_connect(url)
    return error.value.status


async def connects(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(url)
        await ws.close()


def test_a_token_is_short_url_safe_and_names_its_key() -> None:
    token = create_token(KEY, 3600, now=1_800_000_000)
    assert re.fullmatch(r"v2\.[A-Za-z0-9_-]{8}\.1800003600\.u\.[A-Za-z0-9_-]{43}", token)
    assert token.split(".")[1] == key_id(KEY.encode())
    assert len(token) < 80
    bot = "0d7c2f8e-4b1a-4e55-9a3c-2f6d8b1e7a90"
    scoped = create_token(KEY, 3600, now=1_800_000_000, grant=ingest_grant(bot))
    assert scoped.split(".")[3] == f"b~{bot}"
    assert len(scoped) < 120
    TokenCheck((), (KEY.encode(),), clock=lambda: 1_800_003_599.0).verify(token)
    with pytest.raises(TokenError) as error:
        TokenCheck((), (KEY.encode(),), clock=lambda: 1_800_003_600.0).verify(token)
    assert error.value.reason == "expired"


def test_short_keys_and_lifetimes_are_refused() -> None:
    with pytest.raises(ConfigError, match="32 characters"):
        TokenCheck.build([], ["short"])
    with pytest.raises(ConfigError, match="32 characters"):
        create_token("short", 60)
    with pytest.raises(ConfigError, match="positive"):
        create_token(KEY, 0)


async def test_a_signed_token_connects_and_its_meeting_is_archived(
    service: ServiceFactory,
) -> None:
    running = await service(auth_tokens="", token_keys=KEY)
    url = ws_url(running, create_token(KEY, 600))
    await run_simulation(Simulation(url=url, participants=1, seconds=1.5, fps=10))
    await running.settle()
    keys = running.object_keys()
    assert any(k.endswith("/manifest.json") for k in keys)
    assert any(k.endswith(".m4s") for k in keys)


def _tampered(token: str) -> str:
    head, _, signature = token.rpartition(".")
    return f"{head}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"


def _later_expiry(token: str) -> str:
    version, kid, expiry, scope, signature = token.split(".")
    return f"{version}.{kid}.{int(expiry) + 3600}.{scope}.{signature}"


def _other_bot(token: str) -> str:
    version, kid, expiry, _, signature = token.split(".")
    return f"{version}.{kid}.{expiry}.b~someone-else.{signature}"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: create_token(KEY, 60, now=time.time() - 120), "expired"),
        (lambda: _tampered(create_token(KEY, 600)), "bad_signature"),
        (lambda: _later_expiry(create_token(KEY, 600)), "bad_signature"),
        (lambda: _other_bot(create_token(KEY, 600, grant=ingest_grant("bot-1"))), "bad_signature"),
        (lambda: create_token(KEY, 600, grant=view_grant("bot-1", "rec-1")), "wrong_scope"),
        (lambda: create_token(OTHER_KEY, 600), "unknown_key"),
        (lambda: "v1.abc", "malformed"),
        (lambda: "v1.abcdefgh.12x4.sig", "malformed"),
        (lambda: "v1.abcdefgh.١٢٣.sig", "malformed"),
        (lambda: "not-a-token", "unknown_token"),
        (lambda: "", "missing"),
    ],
    ids=[
        "expired",
        "tampered",
        "expiry-extended",
        "scope-changed",
        "viewer-token",
        "wrong-key",
        "truncated",
        "expiry-not-digits",
        "expiry-not-ascii",
        "neither-kind",
        "empty",
    ],
)
async def test_a_bad_signed_token_is_refused_before_upgrade(
    service: ServiceFactory, make: object, reason: str
) -> None:
    running = await service(auth_tokens="", token_keys=KEY)
    assert callable(make)
    assert await refused(ws_url(running, make())) == 401
    totals = running.app[STATE].totals
    assert totals["refused_unauthorized"] == 1
    assert totals[f"refused_token_{reason}"] == 1
    await running.settle()
    assert running.object_keys() == []


async def test_keys_rotate_first_signs_every_one_verifies(service: ServiceFactory) -> None:
    old_token = create_token(OLD_KEY, 600)
    during = await service(auth_tokens="", token_keys=f"{KEY},{OLD_KEY}")
    await connects(ws_url(during, old_token))
    await connects(ws_url(during, create_token(KEY, 600)))
    after = await service(auth_tokens="", token_keys=KEY)
    assert await refused(ws_url(after, old_token)) == 401
    assert after.app[STATE].totals["refused_token_unknown_key"] == 1


async def test_static_and_signed_tokens_work_together(service: ServiceFactory) -> None:
    running = await service(auth_tokens=TOKEN, token_keys=KEY)
    await connects(ws_url(running, TOKEN))
    await connects(ws_url(running, create_token(KEY, 600)))
    assert await refused(ws_url(running, TOKEN + "x")) == 401


async def test_the_viewer_takes_signed_viewer_tokens_too(service: ServiceFactory) -> None:
    running = await service(auth_tokens="", token_keys=KEY, viewer=True)
    page = f"{running.http}/recordings/bot-1/rec-1"
    viewer = view_grant("bot-1", "rec-1")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{page}?token={create_token(KEY, 600, grant=viewer)}") as ok:
            assert ok.status != 401
        async with session.get(f"{page}?token={create_token(KEY, 600)}") as ingest:
            assert ingest.status == 401
        expired = create_token(KEY, 60, now=time.time() - 120, grant=viewer)
        async with session.get(f"{page}?token={expired}") as response:
            assert response.status == 401


async def test_no_token_or_key_reaches_the_logs(
    service: ServiceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    running = await service(auth_tokens=TOKEN, token_keys=f"{KEY},{OLD_KEY}")
    signed = create_token(KEY, 600)
    expired = create_token(OLD_KEY, 60, now=time.time() - 120)
    await run_simulation(Simulation(url=ws_url(running, signed), participants=1, seconds=1, fps=10))
    await connects(ws_url(running, TOKEN))
    for bad in (expired, _tampered(signed), TOKEN + "x"):
        assert await refused(ws_url(running, bad)) == 401
    await running.settle()
    await running.runner.cleanup()
    output = capsys.readouterr()
    logged = output.out + output.err
    assert "connection_opened" in logged
    assert "token expired" in logged
    assert "token bad_signature" in logged
    for secret in (signed, expired, _tampered(signed), TOKEN, KEY, OLD_KEY):
        assert secret not in logged
    # Not even the signature alone.
    assert signed.rpartition(".")[2] not in logged


def test_token_create_prints_one_token_signed_by_the_first_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ARCHIVER_TOKEN_KEYS", f"{KEY},{OLD_KEY}")
    assert main(["token", "create", "--ttl", "5400"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1
    token = printed.strip()
    assert token.split(".")[1] == key_id(KEY.encode())
    assert time.time() + 5300 < int(token.split(".")[2]) <= time.time() + 5401
    TokenCheck.build([], [KEY]).verify(token)


def test_token_create_needs_a_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "create", "--ttl", "60"]) == 2
    assert "ARCHIVER_TOKEN_KEYS" in capsys.readouterr().err


def test_the_service_starts_with_signing_keys_alone() -> None:
    create_app(Settings(_env_file=None, token_keys=KEY))
    with pytest.raises(ConfigError, match="ARCHIVER_TOKEN_KEYS"):
        create_app(Settings(_env_file=None))


async def test_refusals_are_counted_by_reason_in_the_metrics(service: ServiceFactory) -> None:
    port = free_port()
    running = await service(auth_tokens="", token_keys=KEY, metrics_port=port)
    refused_total = "archiver_connections_refused_total"
    before = await scrape(port)
    assert await refused(ws_url(running, create_token(KEY, 1, now=time.time() - 60))) == 401
    assert await refused(ws_url(running, create_token(OTHER_KEY, 600))) == 401
    after = await scrape(port)
    for reason in ("token_expired", "token_unknown_key"):
        counted = total(after, refused_total, reason=reason) - total(
            before, refused_total, reason=reason
        )
        assert counted == 1, reason
