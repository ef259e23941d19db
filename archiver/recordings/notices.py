""" "The recording is ready": a marker beside `session.json`, and a signed webhook notice.

Each completion of a recording has a sequence number (`completions` in session.json). The
task that completes it claims that completion by creating `notices/{seq}.ready.json`
with a conditional write (S3 `If-None-Match: *`; a local folder's exclusive create): only
the task whose write created it sends the notice, so two tasks completing the same
recording at once send one. The outcome goes into `notices/{seq}.delivery.json`.

The claim holds a lease (`webhook_deadline_s` plus one attempt's timeout). A task that
dies after claiming and before the outcome is written leaves a claim without a delivery:
a task that later tries the same completion (it completed the recording too, having seen
the same stored document) takes the claim over once the lease has passed, with a write
conditional on the claim's ETag, and sends the same notice again. So a receiver may see a
notice twice (the first sender died after the receiver took it but before it recorded
so) and should deduplicate by `notice_id`; a notice whose sender died and that no other
task tries again is never sent: its claim without a delivery says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import random
import re
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import structlog
import yarl

from archiver import metrics
from archiver.errors import ObjectConflictError, StoreError
from archiver.layout import RecordingId
from archiver.settings import Settings
from archiver.store.base import ObjectStore

log = structlog.get_logger(__name__)

_JSON = "application/json"
_RETRYABLE_STATUS = frozenset({408, 425, 429})
_COUNTER_NAMES = {"claim_failed": "notice_claims_failed"}
"""/readyz names, where they are not `notices_{outcome}`."""
SIGNATURE_HEADER = "X-Archiver-Signature"
TIMESTAMP_HEADER = "X-Archiver-Timestamp"
NOTICE_ID_HEADER = "X-Archiver-Notice-Id"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value: HMAC-SHA256 over `{timestamp}.{body}` (hex). The
    timestamp inside the signed bytes lets a receiver refuse replays of an old notice."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


@dataclass(frozen=True, slots=True)
class ReadyNotice:
    """One completion of one recording, as announced."""

    recording: RecordingId
    seq: int
    session_key: str
    """The session index's key in the bucket (with the store's prefix)."""
    streams: int
    time_range: tuple[float, float] | None
    """Earliest stream start and latest stream end, seconds into the recording."""
    completed_at: str

    def payload(self) -> dict[str, Any]:
        start, end = self.time_range if self.time_range is not None else (None, None)
        return {
            "type": "recording.ready",
            "notice_id": f"{self.recording.prefix}/{self.seq}",
            "sequence": self.seq,
            "bot_id": self.recording.bot_id,
            "recording_id": self.recording.recording_id,
            "session_key": self.session_key,
            "streams": self.streams,
            "start_s": start,
            "end_s": end,
            "completed_at": self.completed_at,
        }


@dataclass(frozen=True, slots=True)
class _Outcome:
    outcome: str
    """delivered, rejected (a 4xx answer other than 408, 425 and 429) or gave_up."""
    attempts: int
    http_status: int | None
    error: str | None


class ReadyNotices:
    """Claims each completion and, with `webhook_url`, delivers its notice: signed, retried
    with exponential backoff and full jitter for at most `webhook_deadline_s`. Every
    outcome is logged and counted (`counters`, shown by /readyz)."""

    def __init__(self, settings: Settings, store: ObjectStore) -> None:
        self.store = store
        self.url = settings.webhook_url
        secret = settings.webhook_secret
        self.secret = b"" if secret is None else secret.get_secret_value().encode()
        self.timeout_s = settings.webhook_timeout_s
        self.backoff_s = settings.webhook_backoff_s
        self.backoff_max_s = settings.webhook_backoff_max_s
        self.deadline_s = settings.webhook_deadline_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.tasks: set[asyncio.Task[None]] = set()
        self.counters: Counter[str] = Counter()
        self._http: aiohttp.ClientSession | None = None

    @property
    def lease_s(self) -> float:
        return self.deadline_s + self.timeout_s

    def send(self, notice: ReadyNotice) -> None:
        """Claim the completion and deliver its notice, in the background."""
        task = asyncio.create_task(self._run(notice), name=f"notice {notice.recording.prefix}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def wait(self) -> None:
        """Wait for every notice under way (the drain bounds this by its deadline)."""
        while self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stop: a notice still retrying keeps its claim, for another task to take over
        once its lease has passed."""
        for task in list(self.tasks):
            if task.cancel():
                self._count("abandoned")
                log.error("notice_abandoned", task=task.get_name())
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    async def _run(self, notice: ReadyNotice) -> None:
        log_ = log.bind(recording=notice.recording.prefix, completion=notice.seq)
        try:
            payload = await self._claim(notice)
        except StoreError as exc:
            self._count("claim_failed")
            log_.error("notice_claim_failed", error=str(exc))
            return
        if payload is None:
            self._count("claimed_elsewhere")
            log_.info("notice_claimed_elsewhere")
            return
        self._count("claimed")
        if self.url is None:
            log_.info("recording_ready_marked")
            return
        outcome = await self._deliver(orjson.dumps(payload), str(payload["notice_id"]))
        self._count(outcome.outcome)
        details = {
            "attempts": outcome.attempts,
            "http_status": outcome.http_status,
            "error": outcome.error,
            "webhook": describe_url(self.url),
        }
        if outcome.outcome == "delivered":
            log_.info("notice_delivered", **details)
        else:
            log_.error("notice_failed", outcome=outcome.outcome, **details)
        record = {
            "notice_id": payload["notice_id"],
            "outcome": outcome.outcome,
            "attempts": outcome.attempts,
            "http_status": outcome.http_status,
            "error": outcome.error,
            "finished_at": _now().isoformat(),
            "sent_by": self.owner,
        }
        try:
            await self.store.put(
                notice.recording.delivery_key(notice.seq),
                orjson.dumps(record, option=orjson.OPT_INDENT_2),
                _JSON,
                write_once=True,
            )
        except StoreError as exc:
            self.counters["notice_outcomes_unrecorded"] += 1
            log_.error("notice_outcome_unrecorded", error=str(exc))

    async def _claim(self, notice: ReadyNotice) -> dict[str, Any] | None:
        """Create the completion's marker, or take over one whose sender's lease has
        passed with nothing delivered; return the payload to send, None when another task
        has it. The store is tried again (backoff) until the deadline."""
        give_up_at = time.monotonic() + self.deadline_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._claim_once(notice)
            except StoreError as exc:
                if isinstance(exc, ObjectConflictError):
                    raise
                delay = self._delay(attempt)
                if time.monotonic() + delay > give_up_at:
                    raise
                log.warning("notice_claim_retry", key=exc.key, error=exc.cause)
                await asyncio.sleep(delay)

    async def _claim_once(self, notice: ReadyNotice) -> dict[str, Any] | None:
        key = notice.recording.ready_key(notice.seq)
        payload = notice.payload()
        try:
            await self.store.put(key, self._marker(payload), _JSON, write_once=True)
        except ObjectConflictError:
            return await self._take_over(notice)
        return payload

    def _marker(self, payload: dict[str, Any]) -> bytes:
        now = _now()
        marker = {
            "notice": payload,
            "webhook": self.url is not None,
            "claimed_by": self.owner,
            "claimed_at": now.isoformat(),
            "lease_until": (now + timedelta(seconds=self.lease_s)).isoformat(),
        }
        return orjson.dumps(marker, option=orjson.OPT_INDENT_2)

    async def _take_over(self, notice: ReadyNotice) -> dict[str, Any] | None:
        key = notice.recording.ready_key(notice.seq)
        fetched = await self.store.fetch(key)
        if fetched is None or self.url is None:
            return None
        if await self.store.get(notice.recording.delivery_key(notice.seq)) is not None:
            return None
        try:
            marker = orjson.loads(fetched[0])
            lease_until = datetime.fromisoformat(marker["lease_until"])
            payload = marker["notice"]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("notice_marker_unreadable", key=key)
            return None
        if lease_until > _now() or not isinstance(payload, dict):
            return None
        try:
            await self.store.put(key, self._marker(payload), _JSON, replaces=fetched[1])
        except ObjectConflictError:
            return None
        self._count("taken_over")
        log.warning("notice_taken_over", key=key, previous_sender=marker.get("claimed_by"))
        return payload

    async def _deliver(self, body: bytes, notice_id: str) -> _Outcome:
        assert self.url is not None
        if self._http is None:
            self._http = aiohttp.ClientSession()
        give_up_at = time.monotonic() + self.deadline_s
        attempt = 0
        while True:
            attempt += 1
            status: int | None = None
            error: str | None = None
            timestamp = int(time.time())
            headers = {
                "Content-Type": _JSON,
                "User-Agent": "recall-archiver",
                TIMESTAMP_HEADER: str(timestamp),
                SIGNATURE_HEADER: sign(self.secret, timestamp, body),
                NOTICE_ID_HEADER: notice_id,
            }
            try:
                async with self._http.post(
                    self.url,
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                    allow_redirects=False,
                ) as response:
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = _describe_error(exc, self.url)
            if status is not None and 200 <= status < 300:
                return _Outcome("delivered", attempt, status, None)
            if status is not None and status < 500 and status not in _RETRYABLE_STATUS:
                return _Outcome("rejected", attempt, status, f"HTTP {status}")
            delay = self._delay(attempt)
            if time.monotonic() + delay > give_up_at:
                return _Outcome("gave_up", attempt, status, error or f"HTTP {status}")
            self.counters["notice_retries"] += 1
            log.warning(
                "notice_attempt_failed",
                notice_id=notice_id,
                attempt=attempt,
                http_status=status,
                error=error,
                retry_in_s=round(delay, 3),
            )
            await asyncio.sleep(delay)

    def _count(self, outcome: str) -> None:
        self.counters[_COUNTER_NAMES.get(outcome, f"notices_{outcome}")] += 1
        metrics.notice(outcome)

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter: senders that failed together spread out."""
        ceiling = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)


def _now() -> datetime:
    return datetime.now(UTC)


def describe_url(url: str) -> str:
    """`scheme://host[:port]/path` of `url`, for logs and records: never its user-info (a
    password) nor its query or fragment (a token), even when the URL is unusable."""
    try:
        parsed = yarl.URL(url)
    except (ValueError, TypeError):
        # Unusable: nothing before its last "@" (user-info) nor from its query on.
        scheme, separator, rest = url.partition("://")
        rest = re.split(r"[?#]", rest.rpartition("@")[2], maxsplit=1)[0]
        return f"{scheme}{separator}{rest}"
    return str(parsed.with_user(None).with_query(None).with_fragment(None))


def _describe_error(exc: BaseException, url: str) -> str:
    """An attempt's error, for logs and records: an invalid URL's error quotes the whole
    URL, so it is named with the redacted one instead."""
    if isinstance(exc, aiohttp.InvalidURL):
        return f"{type(exc).__name__}({describe_url(url)!r})"
    return repr(exc)
