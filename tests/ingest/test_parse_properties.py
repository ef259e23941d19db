"""Whatever arrives on the socket, parsing returns a message that is safe to route and to
write back as JSON, or raises `InputError`: never another exception."""

from __future__ import annotations

import base64
import copy
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from archiver.errors import InputError
from archiver.ingest.messages import MAX_DEPTH, parse_message
from archiver.layout import safe_id
from archiver.tools.simulator import participant_event
from archiver.values import EventMessage, MediaMessage
from tests.hostile import START, deep, dumps, h264_units, real_media

PROPERTIES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, -1, 1e300, -1e300, 1e12, 5e-324, 2**53 + 1, 1.7976931348623157e308])
    | st.text(max_size=20)
    | st.sampled_from(["", "../..", "a/b", "100", "\U0001d518", "\u0000", "1" * 200, "ab" * 64])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def parse(raw: bytes | str) -> MediaMessage | EventMessage | None:
    """Parse; `None` for a refusal. Anything but `InputError` fails the test."""
    try:
        return parse_message(raw)
    except InputError:
        return None


def assert_safe(message: MediaMessage | EventMessage | None) -> None:
    """What the rest of the service relies on in a message that parsed."""
    if isinstance(message, MediaMessage):
        stream = message.stream
        for value in (stream.recording.bot_id, stream.recording.recording_id):
            assert safe_id("id", value) == value
        assert safe_id("id", stream.participant_id) == stream.participant_id
        assert isinstance(message.buffer_b64, str)
        assert math.isfinite(message.relative_s)
        assert message.absolute.tzinfo is not None
        assert message.absolute.utcoffset() == timedelta(0)
        # The manifest and journal writers serialise these.
        orjson.dumps(message.participant)
        orjson.dumps(message.context.bot)
        orjson.dumps(message.context.recording)
        orjson.dumps([message.context.realtime_endpoint, message.context.video_separate])
    elif isinstance(message, EventMessage):
        if message.recording is not None:
            assert safe_id("id", message.recording.bot_id) == message.recording.bot_id
        if message.participant_id is not None:
            assert safe_id("id", message.participant_id) == message.participant_id
        orjson.dumps(message.body)


# Paths inside a real media message, for mutations that keep the rest of it intact.
MEDIA_PATHS: list[tuple[str, ...]] = [
    (),
    ("event",),
    ("data",),
    ("data", "data"),
    ("data", "data", "buffer"),
    ("data", "data", "timestamp"),
    ("data", "data", "timestamp", "relative"),
    ("data", "data", "timestamp", "absolute"),
    ("data", "data", "type"),
    ("data", "data", "participant"),
    ("data", "data", "participant", "id"),
    ("data", "data", "participant", "name"),
    ("data", "data", "participant", "extra_data"),
    ("data", "bot"),
    ("data", "bot", "id"),
    ("data", "bot", "metadata"),
    ("data", "recording", "id"),
    ("data", "recording", "metadata"),
    ("data", "realtime_endpoint"),
    ("data", "video_separate", "id"),
]

replacements = (
    json_values
    | st.builds(deep, st.integers(min_value=MAX_DEPTH - 8, max_value=1020))
    | st.builds(lambda d: {"nested": deep(d)}, st.integers(min_value=MAX_DEPTH - 8, max_value=400))
    | st.sampled_from(
        [
            "2026-01-01T12:00:00",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-05:00",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999Z",
            "2026-01-01",
            "2026-02-30T00:00:00Z",
            "2026-01-01T23:59:60Z",
            "not a time",
            "!!not base64!!",
            "video_separate_png.data",
            "participant_events.leave",
        ]
    )
)


def mutate(message: dict[str, Any], path: tuple[str, ...], action: str, value: Any) -> Any:
    """Replace, delete or wrap whatever is at `path` (if an earlier mutation left it there);
    return the message."""
    if not path:
        return value if action == "replace" else [message]
    parent: Any = message
    for key in path[:-1]:
        parent = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(parent, dict):
        return message
    key = path[-1]
    if action == "delete":
        parent.pop(key, None)
    elif action == "wrap":
        parent[key] = [parent.get(key)]
    else:
        parent[key] = value
    return message


def good_media() -> dict[str, Any]:
    _, key = h264_units()[0]
    return real_media(key, 0.0)


def good_event() -> dict[str, Any]:
    return participant_event("join", 100, 0.25, START, "bot-1", "rec-1")


def test_the_real_messages_parse() -> None:
    media = parse_message(dumps(good_media()))
    assert isinstance(media, MediaMessage)
    assert media.absolute == START
    assert_safe(media)
    assert_safe(parse_message(dumps(good_event())))


@PROPERTIES
@given(st.binary(max_size=512))
@example(b"")
@example(b"\xff\xfe")
@example(b"[" * 2000)
@example(b"1" * 400)
@example(b'{"event": "video_separate_h264.data", "data": 1e400}')
def test_arbitrary_bytes_parse_or_raise_input_error(raw: bytes) -> None:
    assert_safe(parse(raw))


@PROPERTIES
@given(st.text(max_size=256))
@example("\ud800")
@example('{"event": "x\ud800"}')
def test_arbitrary_text_parses_or_raises_input_error(raw: str) -> None:
    assert_safe(parse(raw))


@PROPERTIES
@given(
    json_values,
    st.sampled_from(
        [
            "video_separate_h264.data",
            "video_separate_png.data",
            "participant_events.join",
            "transcript.data",
        ]
    ),
)
def test_arbitrary_json_under_a_known_event_parses_or_raises_input_error(
    data: Any, event: str
) -> None:
    assert_safe(parse(dumps({"event": event, "data": data})))


@PROPERTIES
@given(
    st.sampled_from([good_media, good_event]),
    st.lists(
        st.tuples(
            st.sampled_from(MEDIA_PATHS),
            st.sampled_from(["replace", "replace", "delete", "wrap"]),
            replacements,
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_mutated_real_messages_parse_or_raise_input_error(
    build: Any, mutations: list[tuple[tuple[str, ...], str, Any]]
) -> None:
    message: Any = build()
    for path, action, value in mutations:
        if not isinstance(message, dict):
            break
        message = mutate(message, path, action, value)
    assert_safe(parse(dumps(message)))


@PROPERTIES
@given(
    st.sampled_from([good_media, good_event]),
    st.lists(
        st.tuples(
            st.integers(min_value=0),
            st.sampled_from(["flip", "cut", "insert", "drop"]),
            st.binary(min_size=1, max_size=8),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_byte_mutations_of_real_messages_parse_or_raise_input_error(
    build: Any, edits: list[tuple[int, str, bytes]]
) -> None:
    raw = bytearray(dumps(build()))
    for position, action, data in edits:
        at = position % max(len(raw), 1)
        if action == "flip" and raw:
            raw[at] ^= data[0] or 1
        elif action == "cut":
            del raw[at:]
        elif action == "insert":
            raw[at:at] = data
        else:
            del raw[at : at + len(data)]
    assert_safe(parse(bytes(raw)))


@PROPERTIES
@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),  # noqa: DTZ001 (hypothesis wants naive bounds)
        max_value=datetime(9999, 12, 30),  # noqa: DTZ001
        # ISO-8601 offsets are whole minutes (zoneinfo's local mean times are not).
        timezones=st.none()
        | st.just(UTC)
        | st.builds(
            lambda minutes: timezone(timedelta(minutes=minutes)),
            st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59),
        ),
    )
)
def test_absolute_is_always_returned_in_utc_at_the_instant_sent(when: datetime) -> None:
    message = good_media()
    message["data"]["data"]["timestamp"]["absolute"] = when.isoformat()
    parsed = parse(dumps(message))
    assert_safe(parsed)
    assert isinstance(parsed, MediaMessage)
    expected = when.replace(tzinfo=UTC) if when.utcoffset() is None else when
    assert parsed.absolute == expected


@pytest.mark.parametrize(
    ("absolute", "expected"),
    [
        ("2026-01-01T12:00:00", datetime(2026, 1, 1, 12, tzinfo=UTC)),
        ("2026-01-01T12:00:00Z", datetime(2026, 1, 1, 12, tzinfo=UTC)),
        ("2026-01-01T14:00:00+02:00", datetime(2026, 1, 1, 12, tzinfo=UTC)),
        ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
        ("9999-12-31T23:59:59Z", datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
        ("0001-01-01T00:00:00+01:00", None),
        ("9999-12-31T23:59:59-05:00", None),
        (1767268800, None),
        (None, None),
    ],
)
def test_naive_times_are_utc_and_times_outside_utc_are_refused(
    absolute: object, expected: datetime | None
) -> None:
    message = good_media()
    message["data"]["data"]["timestamp"]["absolute"] = absolute
    parsed = parse(dumps(message))
    if expected is None:
        assert parsed is None
    else:
        assert isinstance(parsed, MediaMessage)
        assert parsed.absolute == expected
        assert parsed.absolute.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (("data", "data", "participant", "id"), [100], "bad_envelope"),
        (("data", "data", "participant", "id"), True, "bad_envelope"),
        (("data", "data", "participant", "id"), 100.0, "bad_envelope"),
        (("data", "data", "participant", "id"), -5, "invalid_id"),
        (("data", "data", "participant", "id"), 1.8446744073709552e19, "bad_envelope"),
        (("data", "data", "participant", "id"), "1" * 129, "invalid_id"),
        (("data", "data", "timestamp"), "0.5", "bad_envelope"),
        (("data", "data", "timestamp", "relative"), "0.5", "bad_envelope"),
        (("data", "data", "timestamp", "relative"), True, "bad_envelope"),
        (("data", "data", "buffer"), 12345, "bad_envelope"),
        (("data", "data"), [], "bad_envelope"),
        (("data",), "data", "bad_envelope"),
        (("data", "bot", "id"), deep(1000), "too_deep"),
        (("data", "data", "participant", "id"), deep(990), "too_deep"),
        (("data", "data", "participant", "extra_data"), {"x": deep(300)}, "too_deep"),
        (("data", "recording", "metadata"), {"x": deep(MAX_DEPTH)}, "too_deep"),
    ],
)
def test_wrong_types_and_deep_nesting_are_refused_with_their_reason(
    path: tuple[str, ...], value: object, reason: str
) -> None:
    message = mutate(good_media(), path, "replace", value)
    with pytest.raises(InputError) as refused:
        parse_message(dumps(message))
    assert refused.value.reason == reason


def test_deep_nesting_is_refused_for_other_events_too() -> None:
    event = good_event()
    event["data"]["data"]["participant"]["id"] = deep(1015)
    with pytest.raises(InputError) as refused:
        parse_message(dumps(event))
    assert refused.value.reason == "too_deep"
    event["data"]["data"]["participant"]["id"] = deep(MAX_DEPTH - 10)
    assert_safe(parse_message(dumps(event)))


@PROPERTIES
@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**63), 2**63 - 1))
def test_any_finite_relative_parses_the_stream_judges_it(relative: float) -> None:
    """Range checks of `relative` belong to the stream, which counts them in its manifest."""
    message = good_media()
    message["data"]["data"]["timestamp"]["relative"] = relative
    parsed = parse_message(dumps(message))
    assert isinstance(parsed, MediaMessage)
    assert parsed.relative_s == float(relative)


def test_the_buffer_stays_base64_text() -> None:
    message = good_media()
    parsed = parse_message(dumps(message))
    assert isinstance(parsed, MediaMessage)
    assert base64.b64decode(parsed.buffer_b64) == h264_units()[0][1]
    assert copy.deepcopy(message) == message
