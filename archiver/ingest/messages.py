"""Recall realtime messages, validated and turned into plain values for the stream stage.

Parsing happens on the receive loop, so it does only what routing needs: JSON, envelope
shape and ids. The base64 payload stays a string here; it is decoded off the loop.

Whatever the bytes, parsing either returns a message or raises `InputError`: a message
that passes holds ids safe for object keys, an `absolute` time in UTC, and nothing nested
deeper than the archive's own JSON writers can serialise.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import orjson
import pydantic

from archiver.errors import InputError
from archiver.layout import (
    AUDIO_FORMATS,
    AudioFormat,
    MediaFormat,
    RecordingId,
    Source,
    StreamId,
    safe_id,
)
from archiver.values import EventMessage, MediaMessage, RecordingContext

MEDIA_EVENTS: dict[str, MediaFormat] = {
    "video_separate_h264.data": "h264",
    "video_separate_png.data": "png",
}
AUDIO_EVENT = "audio_separate_raw.data"
"""One participant's PCM: archived as the audio format the service is set to store."""
MAX_DEPTH = 64
"""Deepest nesting of objects and arrays accepted in a message. Recall's messages nest about
six levels, customer metadata a few more; the JSON writers of manifests and journals stop at
254, and a message they cannot write back must not get as far as a worker."""

_DATETIME = pydantic.TypeAdapter(datetime)
_LAX_BOOL = pydantic.TypeAdapter(bool)
"""Pydantic's readings of a time and of a flag, so that every accepted spelling is read as
it always was; the rest of the envelope is checked by plain code (a model per message cost
more than the rest of parsing)."""
_VIDEO_TYPES: dict[str, Source] = {"webcam": "webcam", "screenshare": "screenshare"}


class _Refused(Exception):
    """Where the envelope is not what it should be, and what was expected there."""

    def __init__(self, where: str, expected: str) -> None:
        super().__init__(f"{where}: {expected}")


def _object(parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise _Refused(f"{where}{key}", "expected an object")
    return value


def _id(parent: dict[str, Any], where: str) -> int | str:
    """An id is a string or an integer, never a float or a boolean."""
    value = parent.get("id")
    if type(value) is not int and type(value) is not str:
        raise _Refused(f"{where}id", "expected a string or an integer")
    return value


def _optional(parent: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = parent.get(key)
    if value is not None and not isinstance(value, kind):
        raise _Refused(f"{where}{key}", f"expected {kind.__name__} or null")
    return value


def _optional_ref(parent: dict[str, Any], key: str) -> dict[str, Any] | None:
    return None if parent.get(key) is None else _ref(parent, key)


def _ref(parent: dict[str, Any], key: str) -> dict[str, Any]:
    """`bot`, `recording` and the like: an id and optional metadata."""
    ref = _object(parent, key, "data.")
    where = f"data.{key}."
    return {"id": _id(ref, where), "metadata": _optional(ref, "metadata", dict, where)}


def _participant(media: dict[str, Any]) -> dict[str, Any]:
    participant = _object(media, "participant", "data.data.")
    where = "data.data.participant."
    is_host = participant.get("is_host")
    if is_host is not None and type(is_host) is not bool:
        try:
            is_host = _LAX_BOOL.validate_python(is_host)
        except pydantic.ValidationError:
            raise _Refused(f"{where}is_host", "expected a boolean or null") from None
    return {
        "id": _id(participant, where),
        "name": _optional(participant, "name", str, where),
        "is_host": is_host,
        "platform": _optional(participant, "platform", str, where),
        "extra_data": _optional(participant, "extra_data", dict, where),
        "email": _optional(participant, "email", str, where),
    }


def _relative(timestamp: dict[str, Any]) -> float:
    """Any finite number: whether it is a plausible time is the stream's to judge and count."""
    value = timestamp.get("relative")
    if type(value) is int:
        return float(value)
    if type(value) is not float or not math.isfinite(value):
        raise _Refused("data.data.timestamp.relative", "expected a finite number")
    return value


def _absolute(timestamp: dict[str, Any]) -> datetime:
    """An ISO-8601 string. Naive times are taken as UTC; every time leaves here in UTC, so
    no later conversion can step outside the calendar (year 1 at +01:00, year 9999 at
    -05:00)."""
    where = "data.data.timestamp.absolute"
    value = timestamp.get("absolute")
    if not isinstance(value, str):
        raise _Refused(where, "expected an ISO-8601 string")
    try:
        when = _DATETIME.validate_python(value)
    except pydantic.ValidationError:
        raise _Refused(where, "not an ISO-8601 time") from None
    if when.tzinfo is None or when.utcoffset() is None:
        return when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC)
    except OverflowError:
        raise _Refused(where, "outside the representable range in UTC") from None


def parse_message(
    raw: str | bytes, audio_format: AudioFormat = "flac"
) -> MediaMessage | EventMessage:
    """Validate one websocket text message; raise `InputError` saying what is wrong. Audio
    is routed to the stream of `audio_format`, the one it is stored as."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InputError("bad_json", str(exc)) from exc
    if not isinstance(body, dict) or not isinstance(body.get("event"), str):
        raise InputError("bad_envelope", "expected an object with a string 'event'")
    if _deeper_than(body, MAX_DEPTH):
        raise InputError("too_deep", f"nested deeper than {MAX_DEPTH} levels")
    event: str = body["event"]
    media_format = audio_format if event == AUDIO_EVENT else MEDIA_EVENTS.get(event)
    if media_format is None:
        return _parse_event(event, body, raw if isinstance(raw, bytes) else raw.encode())
    try:
        return _parse_media(body, media_format)
    except _Refused as exc:
        raise InputError("bad_envelope", str(exc)) from None


def _video_type(media: dict[str, Any]) -> Source:
    kind = media.get("type")
    source = _VIDEO_TYPES.get(kind) if type(kind) is str else None
    if source is None:
        raise _Refused("data.data.type", "expected 'webcam' or 'screenshare'")
    return source


def _parse_media(body: dict[str, Any], media_format: MediaFormat) -> MediaMessage:
    """The envelope's shape first (`_Refused`), then its ids (`InputError` invalid_id)."""
    envelope = _object(body, "data", "")
    media = _object(envelope, "data", "data.")
    buffer = media.get("buffer")
    if not isinstance(buffer, str):
        raise _Refused("data.data.buffer", "expected a string")
    timestamp = _object(media, "timestamp", "data.data.")
    relative_s = _relative(timestamp)
    absolute = _absolute(timestamp)
    audio = media_format in AUDIO_FORMATS
    source: Source = "audio" if audio else _video_type(media)
    participant = _participant(media)
    bot = _ref(envelope, "bot")
    recording = _ref(envelope, "recording")
    context = RecordingContext(
        bot=bot,
        recording=recording,
        realtime_endpoint=_optional_ref(envelope, "realtime_endpoint"),
        video_separate=None if audio else _optional_ref(envelope, "video_separate"),
        audio_separate=_optional_ref(envelope, "audio_separate") if audio else None,
    )
    stream = StreamId(
        recording=RecordingId(
            bot_id=safe_id("bot.id", bot["id"]),
            recording_id=safe_id("recording.id", recording["id"]),
        ),
        participant_id=safe_id("participant.id", participant["id"]),
        source=source,
        media_format=media_format,
    )
    return MediaMessage(
        stream=stream,
        buffer_b64=buffer,
        relative_s=relative_s,
        absolute=absolute,
        participant=participant,
        context=context,
    )


def _deeper_than(container: dict[str, Any] | list[Any], levels: int) -> bool:
    """Whether objects and arrays nest more than `levels` levels below and including
    `container`. Recursive, but never more than `levels` calls deep, whatever the JSON."""
    if levels == 0:
        return True
    children = container.values() if type(container) is dict else container
    for child in children:
        if (type(child) is dict or type(child) is list) and _deeper_than(child, levels - 1):
            return True
    return False


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
