"""Recall realtime messages, validated and turned into plain values for the stream stage.

Parsing happens on the receive loop, so it does only what routing needs: JSON, envelope
shape and ids. The base64 payload stays a string here; it is decoded off the loop.

Whatever the bytes, parsing either returns a message or raises `InputError`: a message
that passes holds ids safe for object keys, an `absolute` time in UTC, and nothing nested
deeper than the archive's own JSON writers can serialise.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import pydantic

from archiver.errors import InputError
from archiver.layout import MediaFormat, RecordingId, StreamId, safe_id

MEDIA_EVENTS: dict[str, MediaFormat] = {
    "video_separate_h264.data": "h264",
    "video_separate_png.data": "png",
}
MAX_DEPTH = 64
"""Deepest nesting of objects and arrays accepted in a message. Recall's messages nest about
six levels, customer metadata a few more; the JSON writers of manifests and journals stop at
254, and a message they cannot write back must not get as far as a worker."""

_Id = pydantic.StrictInt | pydantic.StrictStr


class _Ref(pydantic.BaseModel):
    id: _Id
    metadata: dict[str, Any] | None = None


class _Timestamp(pydantic.BaseModel):
    relative: float = pydantic.Field(allow_inf_nan=False, strict=True)
    """Any finite number: whether it is a plausible time is the stream's to judge and count."""
    absolute: datetime

    @pydantic.field_validator("absolute", mode="before")
    @classmethod
    def _iso_text(cls, value: object) -> object:
        if not isinstance(value, str):
            raise ValueError("expected an ISO-8601 string")
        return value

    @pydantic.field_validator("absolute")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        """Naive times are taken as UTC; every time leaves here in UTC, so no later
        conversion can step outside the calendar (year 1 at +01:00, year 9999 at -05:00)."""
        if value.tzinfo is None or value.utcoffset() is None:
            return value.replace(tzinfo=UTC)
        try:
            return value.astimezone(UTC)
        except OverflowError as exc:
            raise ValueError("outside the representable range in UTC") from exc


class _Participant(pydantic.BaseModel):
    id: _Id
    name: str | None = None
    is_host: bool | None = None
    platform: str | None = None
    extra_data: dict[str, Any] | None = None
    email: str | None = None


class _MediaData(pydantic.BaseModel):
    buffer: str
    timestamp: _Timestamp
    type: Literal["webcam", "screenshare"]
    participant: _Participant


class _MediaEnvelopeData(pydantic.BaseModel):
    data: _MediaData
    bot: _Ref
    recording: _Ref
    realtime_endpoint: _Ref | None = None
    video_separate: _Ref | None = None


class _MediaEnvelope(pydantic.BaseModel):
    data: _MediaEnvelopeData


@dataclass(frozen=True, slots=True)
class RecordingContext:
    """The customer's ids and metadata for joining the archive to their own records."""

    bot: dict[str, Any]
    recording: dict[str, Any]
    realtime_endpoint: dict[str, Any] | None
    video_separate: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class MediaMessage:
    """One access unit or PNG for one stream, its payload still base64."""

    stream: StreamId
    buffer_b64: str
    relative_s: float
    absolute: datetime
    participant: dict[str, Any]
    context: RecordingContext


@dataclass(frozen=True, slots=True)
class EventMessage:
    """Any other event; routed by recording and participant when the message names them."""

    event: str
    recording: RecordingId | None
    participant_id: str | None
    body: dict[str, Any]
    raw: bytes
    """The message exactly as received, for the events archive."""


def parse_message(raw: str | bytes) -> MediaMessage | EventMessage:
    """Validate one websocket text message; raise `InputError` saying what is wrong."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InputError("bad_json", str(exc)) from exc
    if not isinstance(body, dict) or not isinstance(body.get("event"), str):
        raise InputError("bad_envelope", "expected an object with a string 'event'")
    if _deeper_than(body, MAX_DEPTH):
        raise InputError("too_deep", f"nested deeper than {MAX_DEPTH} levels")
    event: str = body["event"]
    media_format = MEDIA_EVENTS.get(event)
    if media_format is None:
        return _parse_event(event, body, raw if isinstance(raw, bytes) else raw.encode())
    try:
        envelope = _MediaEnvelope.model_validate(body).data
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InputError("bad_envelope", f"{where}: {first['msg']}") from exc
    media = envelope.data
    recording = RecordingId(
        bot_id=safe_id("bot.id", envelope.bot.id),
        recording_id=safe_id("recording.id", envelope.recording.id),
    )
    stream = StreamId(
        recording=recording,
        participant_id=safe_id("participant.id", media.participant.id),
        video_type=media.type,
        media_format=media_format,
    )
    return MediaMessage(
        stream=stream,
        buffer_b64=media.buffer,
        relative_s=media.timestamp.relative,
        absolute=media.timestamp.absolute,
        participant=media.participant.model_dump(),
        context=RecordingContext(
            bot=envelope.bot.model_dump(),
            recording=envelope.recording.model_dump(),
            realtime_endpoint=_dump(envelope.realtime_endpoint),
            video_separate=_dump(envelope.video_separate),
        ),
    )


def _deeper_than(value: object, limit: int) -> bool:
    """Whether objects and arrays nest more than `limit` levels (iterative: JSON may nest
    deeper than Python's recursion limit)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _dump(ref: _Ref | None) -> dict[str, Any] | None:
    return None if ref is None else ref.model_dump()


def _parse_event(event: str, body: dict[str, Any], raw: bytes) -> EventMessage:
    """Other events are never refused for their shape; ids are used for routing only when
    they are safe."""
    data = body.get("data")
    data = data if isinstance(data, dict) else {}
    recording = participant_id = None
    try:
        recording = RecordingId(
            bot_id=safe_id("bot.id", _ref_id(data, "bot")),
            recording_id=safe_id("recording.id", _ref_id(data, "recording")),
        )
        inner = data.get("data")
        participant = inner.get("participant") if isinstance(inner, dict) else None
        if isinstance(participant, dict):
            participant_id = safe_id("participant.id", participant.get("id"))
    except InputError:
        pass
    return EventMessage(
        event=event, recording=recording, participant_id=participant_id, body=body, raw=raw
    )


def _ref_id(data: dict[str, Any], name: str) -> object:
    ref = data.get(name)
    return ref.get("id") if isinstance(ref, dict) else None
