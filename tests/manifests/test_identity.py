"""A recording's identity is fixed by its first writer: a later run (another connection,
another task) cannot rename the bot, the recording or its metadata, and a participant's
details change only through the participant history."""

from __future__ import annotations

from datetime import UTC, datetime

import aiohttp
import orjson

from archiver.tools.simulator import SimulatedStream, encode_stream, media_message
from tests.conftest import RunningService, ServiceFactory

BOT, RECORDING = "bot-id", "rec-1"
KEY = f"{BOT}/{RECORDING}/participants/100/webcam/h264/manifest.json"


async def send(
    running: RunningService, units: list[tuple[float, bytes]], forged: bool = False
) -> None:
    start = datetime(2026, 12, 7, tzinfo=UTC)
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        for relative, data in units:
            message = media_message(data, relative, start, "webcam", 100, BOT, RECORDING)
            if forged:
                message["data"]["bot"]["metadata"] = {"team": "intruder"}
                message["data"]["recording"]["metadata"] = {"ticket": "forged"}
                message["data"]["data"]["participant"]["name"] = "Someone Else"
                message["data"]["data"]["participant"]["email"] = "x@example.com"
            await ws.send_str(orjson.dumps(message).decode())
    await running.settle()


async def test_a_later_run_keeps_the_first_writers_identity(service: ServiceFactory) -> None:
    plan = SimulatedStream(100, "webcam", [(0.0, (160, 120))])
    units = [(t, d) for t, d, _ in encode_stream(plan, 4, 10, keyframe_interval_s=1)]
    first = await service(spool_dir="spool-a")
    await send(first, units[:20])
    second = await service(spool_dir="spool-b")
    await send(second, units[20:], forged=True)
    manifest = await second.json(KEY)
    assert manifest["bot"] == {"id": BOT, "metadata": {"team": "sales"}}
    assert manifest["recording"] == {"id": RECORDING, "metadata": {"ticket": "T-42"}}
    assert manifest["participant"]["name"] == "Someone Else"
    (change,) = manifest["participant_changes"]
    assert change["at"] == 2.0
    assert change["participant"]["email"] == "x@example.com"
    assert manifest["counters"]["identity_conflicts"] == 2
    assert sum(s["frames"] for s in manifest["segments"]) == 40
    session = await second.json(f"{BOT}/{RECORDING}/session.json")
    assert session["bot"] == {"id": BOT, "metadata": {"team": "sales"}}
    assert session["recording"] == {"id": RECORDING, "metadata": {"ticket": "T-42"}}
