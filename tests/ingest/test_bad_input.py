"""Bad messages are counted and skipped; the connection and the other streams go on."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import aiohttp
import orjson

from archiver.consumers.decode_check import check_stream
from archiver.tools.simulator import Simulation, encode_stream, media_message
from tests.conftest import ServiceFactory


async def test_malformed_messages_are_counted_and_skipped_while_streams_go_on(
    service: ServiceFactory, capsys
) -> None:
    running = await service()
    sim = Simulation(url=running.url, participants=2, seconds=2, fps=10)
    streams = sim.plan()
    units = {s.participant_id: list(encode_stream(s, sim.seconds, sim.fps, None)) for s in streams}
    start = datetime.now(UTC)
    ids = {"bot_id": sim.bot_id, "recording_id": sim.recording_id}

    def good(pid: int, index: int) -> dict:
        relative, data, _ = units[pid][index]
        return media_message(data, relative, start, "webcam", pid, **ids)

    bad_base64 = good(100, 5)
    bad_base64["data"]["data"]["buffer"] = "!!not base64!!"
    missing_field = good(100, 5)
    del missing_field["data"]["data"]["timestamp"]
    traversal = good(100, 5)
    traversal["data"]["bot"]["id"] = "../../etc"
    bad_participant = good(101, 5)
    bad_participant["data"]["data"]["participant"]["id"] = "1/../2"
    not_h264 = good(100, 5)
    not_h264["data"]["data"]["buffer"] = base64.b64encode(b"hello world").decode()
    bad_messages = [
        "{not json",
        "[]",
        orjson.dumps({"event": 7}).decode(),
        orjson.dumps(missing_field).decode(),
        orjson.dumps(traversal).decode(),
        orjson.dumps(bad_participant).decode(),
        orjson.dumps(bad_base64).decode(),
        orjson.dumps(not_h264).decode(),
        orjson.dumps({"event": "participant_events.speech_on", "data": {}}).decode(),
        orjson.dumps({"event": "brand_new.event"}).decode(),
    ]
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        for index in range(20):
            for pid in (100, 101):
                await ws.send_str(orjson.dumps(good(pid, index)).decode())
            if index == 10:
                for text in bad_messages:
                    await ws.send_str(text)
                await ws.send_bytes(b"\x00binary")
        assert not ws.closed
    await running.settle()
    for pid in (100, 101):
        key = f"{sim.bot_id}/{sim.recording_id}/participants/{pid}/webcam/h264/manifest.json"
        check = await check_stream(running.store, key, key_prefix="archive/")
        assert check.ok, check.problems
        assert len(check.frames) == 20
    manifest = await running.json(
        f"{sim.bot_id}/{sim.recording_id}/participants/100/webcam/h264/manifest.json"
    )
    counters = manifest["counters"]
    assert counters["invalid_bad_base64"] == 1
    assert counters["invalid_not_annexb"] == 1
    assert counters["dropped_invalid"] == 2
    assert counters["received"] == 22
    assert counters["pending"] == 0
    keys = running.object_keys()
    assert not any("etc" in key or ".." in key for key in keys)
    await running.runner.cleanup()
    logged = capsys.readouterr().out
    for reason in ("bad_json", "bad_envelope", "invalid_id", "binary_message", "bad_base64"):
        assert f'"reason":"{reason}"' in logged
    closed = [orjson.loads(line) for line in logged.splitlines() if "connection_closed" in line]
    assert closed[0]["refused_bad_json"] == 1
    assert closed[0]["refused_bad_envelope"] == 3
    assert closed[0]["refused_invalid_id"] == 2
    assert closed[0]["refused_binary_message"] == 1
    assert closed[0]["events"] == 2
