"""One bad message must never cost a good frame: detectably bad messages inside a
participant's own stream are counted and dropped, every good frame of that participant
and of its neighbour is archived at exactly the time it was sent, and the service lives."""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

import aiohttp
import orjson
import pytest

from archiver.consumers.decode_check import check_png_stream, check_stream
from tests.conftest import ServiceFactory
from tests.hostile import START, h264_units, png_images, real_media
from tests.invariants import assert_counters_add_up

A, B = 100, 101
TICKS = 90_000


def manifest_key(participant_id: int, media_format: str = "h264", source: str = "webcam") -> str:
    return f"bot-1/rec-1/participants/{participant_id}/{source}/{media_format}/manifest.json"


def message(data: bytes, relative_s: float, participant_id: int = A, **changes: Any) -> str:
    """A real media message; `changes` replace fields of its inner `data`."""
    body = real_media(data, relative_s, participant_id)
    body["data"]["data"].update(changes)
    return orjson.dumps(body).decode()


def with_timestamp(data: bytes, relative_s: float, absolute_at_s: float, to: int) -> str:
    """A real unit whose `relative` is absurd while `absolute` is right."""
    absolute = (START + timedelta(seconds=absolute_at_s)).isoformat()
    return message(data, 0, to, timestamp={"relative": relative_s, "absolute": absolute})


def stream_level_bad(units: list[tuple[float, bytes]], at: int, to: int = A) -> dict[str, str]:
    """Messages that parse but must be dropped by the stream of participant `to`, by the
    reason it counts."""
    t, data = units[at]
    _, key = units[0]
    slice_at = key.find(b"\x00\x00\x01\x65")
    return {
        "timestamp_1e300": with_timestamp(data, 1e300, t, to),
        "timestamp_1e12": with_timestamp(data, 1e12, t, to),
        "timestamp_negative": with_timestamp(data, -5.0, t, to),
        "bad_base64": message(data, t, to, buffer="!!not base64!!"),
        "not_annexb": message(data.lstrip(b"\x00")[1:], t, to),
        "no_slice": message(key[: slice_at - 1], t, to),
    }


def connection_level_bad(units: list[tuple[float, bytes]], at: int) -> list[str]:
    """Messages refused before routing: they never reach a stream."""
    t, data = units[at]
    good = orjson.loads(message(data, t))
    participant_as_list = orjson.loads(message(data, t))
    participant_as_list["data"]["data"]["participant"]["id"] = [A]
    return [
        message(data, t)[:-7],
        message(data, t, timestamp=str(t)),
        message(data, t, buffer=12345),
        orjson.dumps(participant_as_list).decode(),
        orjson.dumps({**good, "data": "data"}).decode(),
    ]


async def assert_alive(http: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{http}/healthz") as response:
        assert response.status == 200


def assert_clean(logged: str) -> None:
    assert "Traceback" not in logged
    assert "Task exception was never retrieved" not in logged
    for line in logged.splitlines():
        if line.startswith("{"):
            assert orjson.loads(line).get("level") not in ("error", "critical"), line


async def test_bad_messages_inside_a_stream_cost_no_good_frame_of_it_or_its_neighbour(
    service: ServiceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    running = await service()
    units = list(h264_units(seconds=2))
    bad_at = {5: stream_level_bad(units, 5), 12: stream_level_bad(units, 12)}
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        for index, (t, data) in enumerate(units):
            await ws.send_str(message(data, t, A))
            await ws.send_str(message(data, t, B))
            for text in bad_at.get(index, {}).values():
                await ws.send_str(text)
            if index == 8:
                for text in connection_level_bad(units, index):
                    await ws.send_str(text)
        assert not ws.closed
    await running.settle()
    await assert_alive(running.http)

    sent = [round(t * TICKS) for t, _ in units]
    for participant_id in (A, B):
        check = await check_stream(running.store, manifest_key(participant_id), "archive/")
        assert check.ok, check.problems
        assert [round(f.time_s * TICKS) for f in check.frames] == sent
        assert check.manifest["status"] == "complete"
        counters = assert_counters_add_up(check.manifest)
        assert counters["archived"] == len(units)
    a = (await running.json(manifest_key(A)))["counters"]
    b = (await running.json(manifest_key(B)))["counters"]
    assert a["received"] == len(units) + 12
    assert a["invalid_timestamp"] == 6
    assert a["invalid_bad_base64"] == 2
    assert a["invalid_not_annexb"] == 2
    assert a["invalid_no_slice"] == 2
    assert a["dropped_invalid"] == 12
    assert b["received"] == len(units)
    assert b.get("dropped_invalid", 0) == 0

    await running.runner.cleanup()
    logged = capsys.readouterr().out
    assert_clean(logged)
    closed = [orjson.loads(line) for line in logged.splitlines() if "connection_closed" in line]
    assert closed[0]["refused_bad_json"] == 1
    assert closed[0]["refused_bad_envelope"] == 4


async def test_a_first_frame_with_an_absurd_wall_clock_does_not_poison_its_png_stream(
    service: ServiceFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first frame sets the stream's start. Its `absolute` far outside any meeting (a
    camera's clock at 1969) must not cost the frames after it, nor the batch they share."""
    running = await service(png_batch_frames=4)
    images = png_images(8)
    cut = images[3][: len(images[3]) // 2]
    event = "video_separate_png.data"
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        for n, image in enumerate(images):
            body = real_media(image, n / 2, A, event)
            if n == 0:
                body["data"]["data"]["timestamp"]["absolute"] = "1969-07-20T20:17:40Z"
            await ws.send_str(orjson.dumps(body).decode())
            if n == 3:
                await ws.send_str(orjson.dumps(real_media(cut, n / 2 + 0.1, A, event)).decode())
                absurd = real_media(image, n / 2 + 0.2, A, event)
                absurd["data"]["data"]["timestamp"]["relative"] = 1e300
                await ws.send_str(orjson.dumps(absurd).decode())
    await running.settle()
    await assert_alive(running.http)
    check = await check_png_stream(running.store, manifest_key(A, "png"), "archive/")
    assert check.ok, check.problems
    counters = assert_counters_add_up(check.manifest)
    archived = [f.data for f in check.frames]
    assert archived[-7:] == list(images[1:]), "a good frame after the first was lost"
    assert counters["invalid_truncated_png"] == 1
    assert counters["invalid_timestamp"] >= 1
    assert base64.b64encode(cut) not in [base64.b64encode(f) for f in archived]
    await running.runner.cleanup()
    assert_clean(capsys.readouterr().out)


WRONG_START = {
    # An extra message before the stream: a relative days off (within
    # ARCHIVER_TIMESTAMP_MAX_RELATIVE_S), absolute right. It is dropped.
    "relative": (5e5, 0.0),
    # The stream's own first frame: relative right, absolute hours off. It is kept, its
    # wall clock rebuilt from the stream's start.
    "absolute": (0.0, 7200.0),
}


def first_frame_wrong(data: bytes, which: str, event: str) -> str:
    """A frame of 0 s, its timestamp wrong as `which` says."""
    relative, absolute_at = WRONG_START[which]
    body = real_media(data, 0.0, A, event)
    absolute = (START + timedelta(seconds=absolute_at)).isoformat()
    body["data"]["data"]["timestamp"] = {"relative": relative, "absolute": absolute}
    return orjson.dumps(body).decode()


@pytest.mark.parametrize("which", list(WRONG_START))
async def test_a_wrong_first_frame_does_not_move_the_h264_frames_after_it(
    service: ServiceFactory, capsys: pytest.CaptureFixture[str], which: str
) -> None:
    """The stream's first message is its key frame with a wrong timestamp. Every frame
    decodes at its exact tick, and the wall clock of record is the stream's own."""
    running = await service()
    units = list(h264_units(seconds=2))
    good = units if which == "relative" else units[1:]
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        await ws.send_str(first_frame_wrong(units[0][1], which, "video_separate_h264.data"))
        for t, data in good:
            await ws.send_str(message(data, t, A))
    await running.settle()
    await assert_alive(running.http)

    check = await check_stream(running.store, manifest_key(A), "archive/")
    assert check.ok, check.problems
    assert [round(f.time_s * TICKS) for f in check.frames] == [round(t * TICKS) for t, _ in units]
    counters = assert_counters_add_up(check.manifest)
    assert counters["received"] == len(good) + 1
    assert counters["archived"] == len(units)
    if which == "relative":
        assert counters["invalid_timestamp"] == 1
    else:
        assert counters["absolute_repaired"] == 1
    assert counters.get("timestamps_adjusted", 0) == 0
    assert check.manifest["segments"][0]["start_wallclock"] == START.isoformat()
    await running.runner.cleanup()
    assert_clean(capsys.readouterr().out)


@pytest.mark.parametrize("which", list(WRONG_START))
async def test_a_wrong_first_frame_does_not_move_the_png_frames_after_it(
    service: ServiceFactory, capsys: pytest.CaptureFixture[str], which: str
) -> None:
    running = await service(png_batch_frames=4)
    images = png_images(8)
    event = "video_separate_png.data"
    first = 0 if which == "relative" else 1
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        await ws.send_str(first_frame_wrong(images[0], which, event))
        for n in range(first, len(images)):
            await ws.send_str(orjson.dumps(real_media(images[n], n / 2, A, event)).decode())
    await running.settle()
    await assert_alive(running.http)

    check = await check_png_stream(running.store, manifest_key(A, "png"), "archive/")
    assert check.ok, check.problems
    assert [(f.relative_s, f.data) for f in check.frames] == [
        (n / 2, image) for n, image in enumerate(images)
    ]
    absolutes = [f["absolute"] for b in check.manifest["batches"] for f in b["frames"]]
    assert absolutes == [(START + timedelta(seconds=n / 2)).isoformat() for n in range(8)]
    counters = assert_counters_add_up(check.manifest)
    assert counters["received"] == len(images) - first + 1
    if which == "relative":
        assert counters["invalid_timestamp"] == 1
    else:
        assert counters["absolute_repaired"] == 1
    await running.runner.cleanup()
    assert_clean(capsys.readouterr().out)
