"""A connection that breaks the limits is closed on its own; the others do not notice."""

from __future__ import annotations

import aiohttp

from archiver.consumers.decode_check import check_stream
from archiver.tools.simulator import Simulation, run_simulation
from tests.conftest import ServiceFactory
from tests.ingest.test_drain import manifest_key, prepared


async def test_oversized_message_and_stream_flood_close_only_the_offender(
    service: ServiceFactory,
) -> None:
    running = await service(max_message_bytes=64 * 1024, max_streams_per_connection=4)
    sim, texts = prepared(running.url, seconds=2)
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as good:
        for text in texts[:10]:
            await good.send_str(text)
        async with session.ws_connect(running.url) as oversized:
            await oversized.send_str("x" * (128 * 1024))
            closing = await oversized.receive()
            assert closing.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        flood = Simulation(url=running.url, participants=6, seconds=1, fps=5)
        await run_simulation(flood)
        for text in texts[10:]:
            await good.send_str(text)
        assert not good.closed
    await running.settle()
    check = await check_stream(running.store, manifest_key(sim), key_prefix="archive/")
    assert check.ok, check.problems
    assert len(check.frames) == len(texts)
    session_index = await running.json(f"{flood.bot_id}/{flood.recording_id}/session.json")
    assert len(session_index["streams"]) == 4
    assert all(s["status"] == "complete" for s in session_index["streams"])
