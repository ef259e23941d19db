""" "The recording is ready": session.json completes after the grace, and one signed notice
reaches a real webhook receiver, whatever fails, races or comes back."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson
import pytest
from aiohttp import web
from pydantic import ValidationError

from archiver import logs, metrics
from archiver.errors import ConfigError
from archiver.ingest.server import STATE
from archiver.layout import RecordingId
from archiver.recordings.notices import ReadyNotice, ReadyNotices
from archiver.service.app import create_app
from archiver.settings import Settings
from archiver.store import LocalFolderStore
from archiver.tools.simulator import Simulation as Plan
from archiver.tools.simulator import encode_stream, media_message, participant_event
from tests.conftest import TOKEN, RunningService, ServiceFactory, serve_locally

SECRET = "webhook-secret-3b9d1c"
FAST = {
    "recording_ready_grace_s": 0.5,
    "webhook_secret": SECRET,
    "webhook_backoff_s": 0.05,
    "webhook_backoff_max_s": 0.2,
    "webhook_timeout_s": 5.0,
    "webhook_deadline_s": 30.0,
}


@dataclass
class Receiver:
    """A real HTTP server taking notices; it answers `failures` first attempts with 503."""

    url: str = ""
    failures: int = 0
    status: int = 503
    attempts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts.append((dict(request.headers), body))
        if len(self.attempts) <= self.failures:
            return web.Response(status=self.status)
        check_signature(request.headers, body)
        self.accepted.append(orjson.loads(body))
        return web.Response(status=204)

    async def wait_for(self, count: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.accepted) < count:
            assert time.monotonic() < deadline, f"{len(self.accepted)} notices, not {count}"
            await asyncio.sleep(0.05)


def check_signature(headers: Any, body: bytes) -> None:
    """What a receiver does: the HMAC over `{timestamp}.{body}`, and a recent timestamp."""
    timestamp = headers["X-Archiver-Timestamp"]
    expected = hmac.new(
        SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(headers["X-Archiver-Signature"], f"sha256={expected}")
    assert abs(time.time() - int(timestamp)) < 300


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    runner = web.AppRunner(app)
    found.url = f"{await serve_locally(runner)}/hook?key=query-secret"
    yield found
    await runner.cleanup()


class Reachable(Protocol):
    """A service a bot can connect to: in this process or another."""

    @property
    def url(self) -> str: ...


class Meeting:
    """One bot's recording: webcam frames of participants and their joins."""

    def __init__(self, seconds: float = 2, fps: float = 10) -> None:
        self.plan = Plan(url="", participants=1, seconds=seconds, fps=fps)
        (stream,) = self.plan.plan()
        self.units = list(encode_stream(stream, seconds, fps, keyframe_interval_s=1))
        self.start = datetime.now(UTC)
        self.ids = {"bot_id": self.plan.bot_id, "recording_id": self.plan.recording_id}
        self.recording = RecordingId(self.plan.bot_id, self.plan.recording_id)

    async def connect_and_send(
        self,
        running: Reachable,
        participant_id: int = 100,
        hold_s: float = 0,
        events: bool = True,
    ) -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
            if events:
                join = participant_event("join", participant_id, 0, self.start, **self.ids)
                await ws.send_str(orjson.dumps(join).decode())
            for relative, data, _ in self.units:
                message = media_message(
                    data, relative, self.start, "webcam", participant_id, **self.ids
                )
                await ws.send_str(orjson.dumps(message).decode())
            await asyncio.sleep(hold_s)

    def session_key(self) -> str:
        return f"archive/{self.recording.session_key}"


def delivered_metric() -> float:
    registry = metrics.instruments().registry
    value = registry.get_sample_value("archiver_notices_total", {"outcome": "delivered"})
    return value or 0.0


async def wait_until_notices_settle(
    *services: RunningService, recording: RecordingId, claims: int = 1
) -> None:
    """Until the services have claimed `claims` notices in all, hold nothing of the
    recording (no grace or completion under way) and have finished every notice."""
    deadline = time.monotonic() + 30
    while True:
        claimed = sum(s.app[STATE].notices.counters["notices_claimed"] for s in services)
        busy = any(
            s.app[STATE].notices.tasks or recording in s.app[STATE].writers.sessions.sessions
            for s in services
        )
        if claimed >= claims and not busy:
            return
        assert time.monotonic() < deadline, f"{claimed} claims of {claims}"
        await asyncio.sleep(0.05)


async def wait_for_session(
    running: RunningService, meeting: Meeting, condition: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        raw = await running.store.get(meeting.recording.session_key)
        if raw is not None and condition(session := orjson.loads(raw)):
            return session
        assert time.monotonic() < deadline, "session.json never got there"
        await asyncio.sleep(0.02)


async def test_an_ended_meeting_completes_after_the_grace_with_one_signed_notice(
    service: ServiceFactory, receiver: Receiver
) -> None:
    running = await service(webhook_url=receiver.url, **FAST)
    meeting = Meeting()
    await meeting.connect_and_send(running)
    await receiver.wait_for(1)
    await wait_until_notices_settle(running, recording=meeting.recording)

    (notice,) = receiver.accepted
    session = await running.json(meeting.recording.session_key)
    assert session["complete"] is True
    assert session["completions"] == 1
    assert notice["type"] == "recording.ready"
    assert notice["bot_id"] == meeting.plan.bot_id
    assert notice["recording_id"] == meeting.plan.recording_id
    assert notice["session_key"] == meeting.session_key()
    assert notice["sequence"] == 1
    assert notice["notice_id"] == f"{meeting.recording.prefix}/1"
    assert notice["streams"] == 1
    assert notice["completed_at"] == session["completed_at"]
    assert 0 <= notice["start_s"] < notice["end_s"]
    assert len(receiver.attempts) == 1

    marker = await running.json(meeting.recording.ready_key(1))
    assert marker["notice"] == notice
    delivery = await running.json(meeting.recording.delivery_key(1))
    assert delivery["outcome"] == "delivered"
    assert delivery["attempts"] == 1
    state = running.app[STATE]
    assert state.notices.counters["notices_delivered"] == 1
    async with aiohttp.ClientSession() as client, client.get(f"{running.http}/readyz") as r:
        readiness = await r.json()
    assert readiness["notices"]["notices_delivered"] == 1
    assert readiness["recordings_waiting"] == 0


async def test_a_failing_receiver_is_retried_and_gets_the_notice_once(
    service: ServiceFactory, receiver: Receiver
) -> None:
    receiver.failures = 3
    delivered_before = delivered_metric()
    running = await service(webhook_url=receiver.url, **FAST)
    meeting = Meeting()
    await meeting.connect_and_send(running)
    await receiver.wait_for(1)
    await wait_until_notices_settle(running, recording=meeting.recording)

    assert len(receiver.accepted) == 1
    assert len(receiver.attempts) == 4
    delivery = await running.json(meeting.recording.delivery_key(1))
    assert delivery["outcome"] == "delivered"
    assert delivery["attempts"] == 4
    assert running.app[STATE].notices.counters["notice_retries"] == 3
    assert delivered_metric() == delivered_before + 1


async def test_a_receiver_refusing_the_notice_is_not_retried(
    service: ServiceFactory, receiver: Receiver
) -> None:
    receiver.failures, receiver.status = 1, 400
    running = await service(webhook_url=receiver.url, **FAST)
    meeting = Meeting()
    await meeting.connect_and_send(running)
    await wait_until_notices_settle(running, recording=meeting.recording)

    assert len(receiver.attempts) == 1
    delivery = await running.json(meeting.recording.delivery_key(1))
    assert (delivery["outcome"], delivery["http_status"]) == ("rejected", 400)
    assert running.app[STATE].notices.counters["notices_rejected"] == 1


async def test_two_services_ending_one_recording_together_send_one_notice(
    service: ServiceFactory, receiver: Receiver
) -> None:
    first = await service(webhook_url=receiver.url, **FAST)
    second = await service(webhook_url=receiver.url, **FAST)
    meeting = Meeting()
    # The bot's participants reach two tasks at once (its connection moved, say), and both
    # end together: both complete the recording, and each tries to announce it. (The events
    # go to one: two apps in one process would name their events batches alike.)
    await asyncio.gather(
        meeting.connect_and_send(first, participant_id=100),
        meeting.connect_and_send(second, participant_id=200, events=False),
    )
    await receiver.wait_for(1)
    await wait_until_notices_settle(first, second, recording=meeting.recording)

    assert len(receiver.accepted) == 1
    session = await first.json(meeting.recording.session_key)
    assert session["complete"] is True
    assert session["completions"] == 1
    assert len(session["streams"]) == 2
    # The second either saw the first's completion and took it as its own, or completed
    # too and lost the claim: either way, one notice.
    assert sum(s.app[STATE].notices.counters["notices_claimed"] for s in (first, second)) == 1


async def test_a_connection_back_within_the_grace_delays_the_notice_until_it_ends(
    service: ServiceFactory, receiver: Receiver
) -> None:
    running = await service(webhook_url=receiver.url, **{**FAST, "recording_ready_grace_s": 2})
    meeting = Meeting()
    await meeting.connect_and_send(running)
    # Back at once (well within the grace), and kept open longer than the grace.
    returned = asyncio.create_task(meeting.connect_and_send(running, hold_s=3))
    session = await wait_for_session(running, meeting, lambda s: len(s["streams"]) == 1)
    assert session["complete"] is False
    await returned
    assert receiver.attempts == []

    await receiver.wait_for(1)
    await wait_until_notices_settle(running, recording=meeting.recording)
    assert len(receiver.accepted) == 1
    assert receiver.accepted[0]["sequence"] == 1


async def test_a_connection_back_after_completion_reopens_it_and_a_second_notice_follows(
    service: ServiceFactory, receiver: Receiver
) -> None:
    running = await service(webhook_url=receiver.url, **FAST)
    meeting = Meeting()
    await meeting.connect_and_send(running)
    await receiver.wait_for(1)

    returned = asyncio.create_task(meeting.connect_and_send(running, hold_s=1))
    reopened = await wait_for_session(running, meeting, lambda s: not s["complete"])
    assert reopened["completions"] == 1
    await returned
    await receiver.wait_for(2)
    await wait_until_notices_settle(running, recording=meeting.recording, claims=2)

    assert [n["sequence"] for n in receiver.accepted] == [1, 2]
    session = await running.json(meeting.recording.session_key)
    assert (session["complete"], session["completions"]) == (True, 2)


async def test_without_a_webhook_the_ready_marker_still_says_so(service: ServiceFactory) -> None:
    running = await service(recording_ready_grace_s=0.2)
    meeting = Meeting()
    await meeting.connect_and_send(running)
    await wait_until_notices_settle(running, recording=meeting.recording)

    marker = await running.json(meeting.recording.ready_key(1))
    assert marker["webhook"] is False
    assert marker["notice"]["session_key"] == meeting.session_key()
    assert await running.store.get(meeting.recording.delivery_key(1)) is None
    assert (await running.json(meeting.recording.session_key))["complete"] is True


def _notice(recording: RecordingId) -> ReadyNotice:
    return ReadyNotice(recording, 1, f"{recording.session_key}", 1, (0.0, 1.0), "2026-01-01")


def _settings(url: str) -> Settings:
    return Settings(_env_file=None, webhook_url=url, **FAST)


async def test_processes_sharing_a_folder_claim_a_notice_once(
    tmp_path: Path, receiver: Receiver
) -> None:
    recording = RecordingId("bot-1", "rec-1")
    senders = [ReadyNotices(_settings(receiver.url), LocalFolderStore(tmp_path)) for _ in range(8)]
    for sender in senders:
        sender.send(_notice(recording))
    await asyncio.gather(*(sender.wait() for sender in senders))
    await asyncio.gather(*(sender.close() for sender in senders))

    assert len(receiver.accepted) == 1
    assert sum(s.counters["notices_claimed"] for s in senders) == 1
    assert sum(s.counters["notices_claimed_elsewhere"] for s in senders) == 7


async def test_a_claim_whose_sender_died_is_taken_over_after_its_lease(
    tmp_path: Path, receiver: Receiver
) -> None:
    recording = RecordingId("bot-1", "rec-1")
    store = LocalFolderStore(tmp_path)
    notice = _notice(recording)
    lapsed = datetime.now(UTC) - timedelta(seconds=1)
    dead = {
        "notice": notice.payload(),
        "webhook": True,
        "claimed_by": "a task that died",
        "claimed_at": (lapsed - timedelta(seconds=60)).isoformat(),
        "lease_until": lapsed.isoformat(),
    }
    await store.put(recording.ready_key(1), orjson.dumps(dead), "application/json")
    live = {**dead, "lease_until": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}
    other = RecordingId("bot-1", "rec-2")
    await store.put(other.ready_key(1), orjson.dumps(live), "application/json")

    sender = ReadyNotices(_settings(receiver.url), store)
    sender.send(notice)
    sender.send(_notice(other))
    await sender.wait()
    await sender.close()

    assert [n["recording_id"] for n in receiver.accepted] == ["rec-1"]
    assert sender.counters["notices_taken_over"] == 1
    marker = orjson.loads((tmp_path / recording.ready_key(1)).read_bytes())
    assert marker["claimed_by"] == sender.owner
    delivery = orjson.loads((tmp_path / recording.delivery_key(1)).read_bytes())
    assert delivery["outcome"] == "delivered"


async def test_a_drain_completes_recordings_in_their_grace_but_not_those_it_ends(
    service: ServiceFactory, receiver: Receiver
) -> None:
    running = await service(webhook_url=receiver.url, **{**FAST, "recording_ready_grace_s": 600})
    ended, cut = Meeting(), Meeting()
    await ended.connect_and_send(running)
    waiting = running.app[STATE].writers.sessions.waiting
    deadline = time.monotonic() + 30
    while ended.recording not in waiting:
        assert time.monotonic() < deadline, "the ended recording never began its grace"
        await asyncio.sleep(0.02)

    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        for relative, data, _ in cut.units:
            message = media_message(data, relative, cut.start, "webcam", 100, **cut.ids)
            await ws.send_str(orjson.dumps(message).decode())
        await wait_for_session(running, cut, lambda s: len(s["streams"]) == 1)
        shutdown = asyncio.create_task(running.runner.cleanup())
        closing = await ws.receive()
        assert closing.type is aiohttp.WSMsgType.CLOSE
        await shutdown

    assert [n["recording_id"] for n in receiver.accepted] == [ended.plan.recording_id]
    assert (await running.json(ended.recording.session_key))["complete"] is True
    assert (await running.json(cut.recording.session_key))["complete"] is False
    assert await running.store.get(cut.recording.ready_key(1)) is None


def test_a_webhook_needs_its_secret_and_an_http_url() -> None:
    with pytest.raises(ConfigError, match="ARCHIVER_WEBHOOK_SECRET"):
        create_app(Settings(_env_file=None, auth_tokens=TOKEN, webhook_url="https://h.example/"))
    with pytest.raises(ValidationError, match="webhook URL"):
        Settings(_env_file=None, webhook_url="ftp://h.example/", webhook_secret="s")


def _with_credentials(url: str, host: str | None = None) -> str:
    """`url` with user-info (a password) in it, and `host` (host:port) instead of its own."""
    scheme, _, rest = url.partition("://")
    authority, _, path = rest.partition("/")
    return f"{scheme}://hook-user:pw-secret-91@{host or authority}/{path}"


async def _deliver_once(tmp_path: Path, settings: Settings, recording: RecordingId) -> None:
    logs.configure("info", "json")
    sender = ReadyNotices(settings, LocalFolderStore(tmp_path))
    sender.send(_notice(recording))
    await sender.wait()
    await sender.close()


async def test_the_webhook_urls_user_info_and_query_are_never_logged_or_recorded(
    tmp_path: Path, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _with_credentials(receiver.url)
    recording = RecordingId("bot-1", "rec-1")
    await _deliver_once(tmp_path, _settings(url), recording)

    assert len(receiver.accepted) == 1
    delivery = (tmp_path / recording.delivery_key(1)).read_text()
    assert orjson.loads(delivery)["outcome"] == "delivered"
    logged = capsys.readouterr().out
    (line,) = [orjson.loads(n) for n in logged.splitlines() if "notice_delivered" in n]
    host = receiver.url.partition("://")[2].partition("/")[0]
    assert line["webhook"] == f"http://{host}/hook"
    for secret in ("hook-user", "pw-secret-91", "query-secret"):
        assert secret not in logged
        assert secret not in delivery


async def test_an_unusable_webhook_url_is_not_quoted_in_logs_or_records(
    tmp_path: Path, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _with_credentials(receiver.url, host="127.0.0.1:99999")
    settings = Settings(_env_file=None, webhook_url=url, **{**FAST, "webhook_deadline_s": 0.3})
    recording = RecordingId("bot-1", "rec-1")
    await _deliver_once(tmp_path, settings, recording)

    delivery = (tmp_path / recording.delivery_key(1)).read_text()
    record = orjson.loads(delivery)
    assert record["outcome"] == "gave_up"
    assert "http://127.0.0.1:99999/hook" in record["error"]
    logged = capsys.readouterr().out
    assert "notice_attempt_failed" in logged
    assert "notice_failed" in logged
    for secret in ("hook-user", "pw-secret-91", "query-secret"):
        assert secret not in logged
        assert secret not in delivery
