"""A signed token admits one bot (named when minted, or bound to the first it writes for,
durably, so every task agrees) and a viewer token opens one recording: a token in the wrong
hands writes nothing into another bot's recording and opens nothing of it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import parse_qs, urlparse

import aiohttp
import orjson
import pytest

from archiver.cli import main
from archiver.ingest.bindings import BINDINGS_PREFIX
from archiver.ingest.server import STATE
from archiver.ingest.tokens import TokenCheck, create_token, ingest_grant, key_id, view_grant
from archiver.tools.simulator import Simulation, run_simulation
from tests.conftest import RunningService, ServiceFactory

KEY = "k1-" + "a" * 40


def ws_url(running: RunningService, token: str) -> str:
    return f"ws://127.0.0.1:{running.port}/ws?token={token}"


def etags(running: RunningService, s3: object, prefix: str) -> dict[str, str]:
    """Every object under `prefix` (relative to the archive) and its ETag."""
    pages = s3.get_paginator("list_objects_v2")  # type: ignore[attr-defined]
    return {
        obj["Key"]: obj["ETag"]
        for page in pages.paginate(Bucket=running.bucket, Prefix=f"archive/{prefix}")
        for obj in page.get("Contents", [])
    }


async def meeting(running: RunningService, token: str, bot_id: str, **options: object) -> None:
    sim = Simulation(
        url=ws_url(running, token),
        participants=1,
        seconds=1.5,
        fps=10,
        bot_id=bot_id,
        recording_id="rec-1",
        **options,  # type: ignore[arg-type]
    )
    await run_simulation(sim)
    await running.settle()


async def test_a_token_for_one_bot_writes_nothing_into_another_bots_recording(
    service: ServiceFactory, s3: object
) -> None:
    running = await service(auth_tokens="", token_keys=KEY)
    intruder = create_token(KEY, 600, grant=ingest_grant("bot-a"))
    # Bot A's token, used to write for bot B before B's bot starts: nothing is stored.
    await meeting(running, intruder, "bot-b", start_relative_s=10)
    assert etags(running, s3, "bot-b/") == {}
    await meeting(running, create_token(KEY, 600, grant=ingest_grant("bot-b")), "bot-b")
    victim = etags(running, s3, "bot-b/")
    assert any(key.endswith(".m4s") for key in victim)
    # And after it: the same stream, new participants.
    await meeting(running, intruder, "bot-b", first_participant_id=100)
    await meeting(running, intruder, "bot-b", first_participant_id=200, start_relative_s=10)
    assert etags(running, s3, "bot-b/") == victim
    totals = running.app[STATE].totals
    assert totals["refused_wrong_bot"] > 30
    # Its own bot is archived as usual.
    await meeting(running, intruder, "bot-a")
    assert any(key.endswith(".m4s") for key in etags(running, s3, "bot-a/"))


async def test_an_unbound_token_belongs_to_the_first_bot_on_every_task(
    service: ServiceFactory, s3: object
) -> None:
    """Minted without a bot: the first bot it writes for owns it, in the store; another
    task that sees it later for another bot refuses that bot's messages."""
    task_a = await service(auth_tokens="", token_keys=KEY, spool_dir="spool-a")
    task_b = await service(auth_tokens="", token_keys=KEY, spool_dir="spool-b")
    token = create_token(KEY, 600)
    await meeting(task_a, token, "bot-b")
    victim = etags(task_a, s3, "bot-b/")
    (binding,) = etags(task_a, s3, f"{BINDINGS_PREFIX}/")
    stored = s3.get_object(Bucket=task_a.bucket, Key=binding)["Body"].read()  # type: ignore[attr-defined]
    assert orjson.loads(stored) == {"bot_id": "bot-b"}
    await meeting(task_b, token, "bot-c")
    assert etags(task_b, s3, "bot-c/") == {}
    assert task_b.app[STATE].totals["refused_wrong_bot"] > 10
    await meeting(task_b, token, "bot-b", first_participant_id=300, start_relative_s=5)
    after = etags(task_b, s3, "bot-b/")
    assert set(victim) < set(after), "the owner goes on writing on another task"


async def test_a_viewer_token_opens_its_recording_and_nothing_else(
    service: ServiceFactory,
) -> None:
    running = await service(auth_tokens="", token_keys=KEY, viewer=True, viewer_url_expiry_s=3600)
    await meeting(running, create_token(KEY, 600, grant=ingest_grant("bot-b")), "bot-b")
    viewer = create_token(KEY, 120, grant=view_grant("bot-b", "rec-1"))
    other = create_token(KEY, 120, grant=view_grant("bot-b", "rec-2"))
    ingest = create_token(KEY, 600, grant=ingest_grant("bot-b"))
    page = f"{running.http}/recordings/bot-b/rec-1"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{page}/streams.json?token={viewer}") as response:
            assert response.status == 200
            listing = await response.json()
        for refused in (other, ingest, "nonsense"):
            async with session.get(f"{page}/streams.json?token={refused}") as response:
                assert response.status == 401
            async with session.get(f"{page}?token={refused}") as response:
                assert response.status == 401
        (stream,) = listing["streams"]
        async with session.get(running.http + stream["playlist_url"]) as response:
            assert response.status == 200
            playlist = await response.text()
    presigned = [line for line in playlist.splitlines() if "X-Amz-Expires" in line]
    assert presigned
    for line in presigned:
        uri = line.split('URI="')[-1].rstrip('"')
        expires = int(parse_qs(urlparse(uri).query)["X-Amz-Expires"][0])
        assert expires <= 120, "a link never outlives the token that asked for it"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused_upgrade:
            await session.ws_connect(ws_url(running, viewer))
    assert refused_upgrade.value.status == 401
    assert running.app[STATE].totals["refused_token_wrong_scope"] == 1


def test_token_create_scopes_a_token_to_a_bot_or_a_recording(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ARCHIVER_TOKEN_KEYS", KEY)
    check = TokenCheck.build([], [KEY])
    assert main(["token", "create", "--ttl", "600", "--bot", "bot-b"]) == 0
    bot = check.verify(capsys.readouterr().out.strip())
    assert (bot.kind, bot.bot_id, bot.recording_id) == ("ingest", "bot-b", None)
    assert main(["token", "create", "--ttl", "600", "--view", "bot-b/rec-1"]) == 0
    view = check.verify(capsys.readouterr().out.strip())
    assert (view.kind, view.bot_id, view.recording_id) == ("view", "bot-b", "rec-1")
    assert view.opens("bot-b", "rec-1")
    assert not view.opens("bot-b", "rec-2")
    assert main(["token", "create", "--ttl", "600", "--bot", "../other"]) == 2
    assert "not a bot or recording id" in capsys.readouterr().err


def test_a_token_minted_before_scopes_is_an_unbound_ingest_token() -> None:
    """`v1.<key id>.<expiry>.<signature>`, as earlier versions minted it."""
    signed = f"v1.{key_id(KEY.encode())}.{int(time.time()) + 600}"
    digest = hmac.digest(KEY.encode(), signed.encode(), hashlib.sha256)
    token = f"{signed}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"
    grant = TokenCheck.build([], [KEY]).verify(token)
    assert grant.kind == "ingest"
    assert grant.bot_id is None
    assert grant.binding is not None
