"""A poisoned message against the real process tree: no crash, no crash loop, a quick drain."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import aiohttp
import orjson

from archiver.consumers.decode_check import check_stream
from archiver.tools.simulator import Simulation, encode_stream, media_message
from tests.faults.conftest import ServiceProcesses


async def test_an_absurd_timestamp_costs_one_frame_and_sigterm_still_drains_at_once(
    services: ServiceProcesses,
) -> None:
    service = await services.start(segment_target_s=1)
    sim = Simulation(url=service.url, participants=2, seconds=4, fps=15)
    plans = sim.plan()
    units = list(encode_stream(plans[0], sim.seconds, sim.fps, keyframe_interval_s=1))
    start = datetime.now(UTC)
    ids = {"bot_id": sim.bot_id, "recording_id": sim.recording_id}
    async with aiohttp.ClientSession() as session, session.ws_connect(service.url) as ws:
        for index, (relative, data, _) in enumerate(units):
            for pid in (100, 101):
                message = media_message(data, relative, start, "webcam", pid, **ids)
                await ws.send_str(orjson.dumps(message).decode())
            if index == 20:
                poisoned = media_message(data, relative, start, "webcam", 100, **ids)
                poisoned["data"]["data"]["timestamp"]["relative"] = 1e300
                await ws.send_str(orjson.dumps(poisoned).decode())
                skewed = media_message(data, relative + 0.01, start, "webcam", 100, **ids)
                skewed["data"]["data"]["timestamp"]["relative"] = 1e12
                await ws.send_str(orjson.dumps(skewed).decode())
        async with asyncio.timeout(10):  # until both streams are under way
            while (await service.readiness())[1]["streams"] < 2:  # noqa: ASYNC110 (a count)
                await asyncio.sleep(0.02)
        stopping = time.monotonic()
        assert await service.stop() == 0
        stopped_s = time.monotonic() - stopping
    assert stopped_s < 10, f"drain took {stopped_s:.1f} s"
    for pid in (100, 101):
        key = f"{sim.bot_id}/{sim.recording_id}/participants/{pid}/webcam/h264/manifest.json"
        check = await check_stream(services.store, key, key_prefix="archive/")
        assert check.ok, check.problems
        assert [round(f.time_s, 4) for f in check.frames] == [round(u[0], 4) for u in units]
        assert check.manifest["status"] == "complete"
        counters = check.manifest["counters"]
        assert counters.get("invalid_timestamp", 0) == (2 if pid == 100 else 0)
        assert counters["worker_failures"] == 0
    events = [line["event"] for line in service.logs()]
    assert "stream_worker_failed" not in events
    assert events.count("service_started") == 1, "the worker was restarted"
