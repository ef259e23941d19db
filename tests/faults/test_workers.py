"""Several workers on one port: bots land on different workers, and a killed worker's
replacement recovers exactly its slot while a sibling keeps archiving its own bot."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
import orjson

from archiver.consumers.decode_check import check_stream
from archiver.tools.simulator import SimulatedStream, encode_stream, media_message
from tests.faults.conftest import ServiceProcess, ServiceProcesses
from tests.faults.test_faults import wait_for_manifest

FPS = 15
SECONDS = 10.0


@dataclass
class Bot:
    """One bot on its own connection: one H.264 webcam, sent in real time."""

    name: str
    ws: aiohttp.ClientWebSocketResponse
    start: datetime = field(default_factory=lambda: datetime.now(UTC))
    units: list[tuple[float, bytes]] = field(default_factory=list)
    sent: int = 0
    pid: int = 0

    @property
    def manifest_key(self) -> str:
        return f"{self.name}/rec-1/participants/100/webcam/h264/manifest.json"

    async def send_next(self) -> None:
        relative, data = self.units[self.sent]
        message = media_message(data, relative, self.start, "webcam", 100, self.name, "rec-1")
        await self.ws.send_str(orjson.dumps(message).decode())
        self.sent += 1


def encode() -> list[tuple[float, bytes]]:
    stream = SimulatedStream(100, "webcam", [(0.0, (320, 240))])
    return [(relative, data) for relative, data, _ in encode_stream(stream, SECONDS, FPS, 2.0)]


async def worker_of(service: ServiceProcess, bot: str, timeout_s: float = 10) -> int:
    """The pid of the worker whose stream of `bot` started (from its log line)."""
    async with asyncio.timeout(timeout_s):
        while True:
            for line in service.logs():
                if line["event"] == "stream_started" and line.get("bot") == bot:
                    return int(line["pid"])
            await asyncio.sleep(0.05)


def connections_opened(service: ServiceProcess) -> list[dict[str, object]]:
    return [line for line in service.logs() if line["event"] == "connection_opened"]


@contextlib.asynccontextmanager
async def bots_on(
    service: ServiceProcess, workers: int, tries: int = 24
) -> AsyncIterator[dict[int, Bot]]:
    """Connect bots (each sending its first key frame) until `workers` different workers
    hold one; yield one bot per worker, by pid. The others are closed at once."""
    units = await asyncio.to_thread(encode)
    held: dict[int, Bot] = {}
    async with aiohttp.ClientSession() as session:
        extra: list[aiohttp.ClientWebSocketResponse] = []
        try:
            for n in range(tries):
                ws = await session.ws_connect(service.url)
                bot = Bot(f"bot-{n}", ws, units=units)
                await bot.send_next()
                bot.pid = await worker_of(service, bot.name)
                if bot.pid in held:
                    extra.append(ws)
                    continue
                held[bot.pid] = bot
                if len(held) == workers:
                    break
            for ws in extra:
                await ws.close()
            assert len(held) == workers, f"{tries} connections landed on {sorted(held)}"
            yield held
        finally:
            for bot in held.values():
                await bot.ws.close()


async def test_bots_are_served_by_several_workers(services: ServiceProcesses) -> None:
    service = await services.start(workers=2)
    pids = await service.wait_for_workers(2)
    async with bots_on(service, 2) as held:
        assert set(held) == set(pids)
    slots = {
        line["pid"]: line["slot"]
        for line in service.logs()
        if line["event"] == "worker_slot_claimed"
    }
    assert sorted(slots[pid] for pid in pids) == [0, 1]
    seen = set()
    for _ in range(40):
        status, readiness = await service.readiness()
        assert status == 200
        seen.add((readiness["pid"], readiness["slot"]))
        if len(seen) == 2:
            break
    assert {pid for pid, _ in seen} <= set(pids)


async def test_a_burst_of_bots_arriving_together_is_spread_over_the_workers(
    services: ServiceProcesses,
) -> None:
    """Bots reconnecting at once (another task drained) must not all land on one worker:
    each worker takes one connection at a time and pauses, so its sibling takes some."""
    service = await services.start(workers=2)
    pids = set(await service.wait_for_workers(2))
    async with aiohttp.ClientSession() as session:
        # Both workers stopped while the connections arrive: all 16 wait in the kernel.
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            connecting = [asyncio.ensure_future(session.ws_connect(service.url)) for _ in range(16)]
            await asyncio.sleep(0.5)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        sockets = await asyncio.gather(*connecting)
        async with asyncio.timeout(10):
            while True:
                opened = connections_opened(service)
                if len(opened) == 16:
                    break
                await asyncio.sleep(0.05)
        for ws in sockets:
            await ws.close()
    serving = {line["pid"] for line in opened}
    assert serving == pids, f"16 connections landed on {sorted(serving)} of {sorted(pids)}"


async def test_a_killed_worker_is_recovered_by_its_replacement_while_a_sibling_archives(
    services: ServiceProcesses,
) -> None:
    service = await services.start(workers=2, segment_target_s=6)
    await service.wait_for_workers(2)
    async with bots_on(service, 2) as held:
        (doomed_pid, doomed), (sibling_pid, sibling) = sorted(held.items())
        slot_of = {
            line["pid"]: line["slot"]
            for line in service.logs()
            if line["event"] == "worker_slot_claimed"
        }
        began = time.monotonic()
        for index in range(1, int(4.5 * FPS)):
            for bot in (doomed, sibling):
                await bot.send_next()
            await asyncio.sleep(max(0, began + index / FPS - time.monotonic()))
        os.kill(doomed_pid, signal.SIGKILL)
        # The sibling's bot goes on to the end while the dead worker is replaced.
        while sibling.sent < len(sibling.units):
            await sibling.send_next()
            await asyncio.sleep(max(0, began + sibling.sent / FPS - time.monotonic()))
        closing = await doomed.ws.receive()
        assert closing.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR,
        )
        assert sibling_pid in service.worker_pids()
    (replacement,) = set(await service.wait_for_workers(2)) - {sibling_pid}

    # The sibling's stream: untouched, complete, every frame at its exact time.
    manifest = await wait_for_manifest(services, sibling.manifest_key, "complete")
    check = await check_stream(services.store, sibling.manifest_key, key_prefix="archive/")
    assert check.ok, check.problems
    assert [round(f.time_s, 3) for f in check.frames] == [
        round(relative, 3) for relative, _ in sibling.units
    ]
    assert not any(s.get("recovered") for s in manifest["segments"])

    # The dead worker's stream: its journal recovered by the replacement, in its slot.
    manifest = await wait_for_manifest(services, doomed.manifest_key, "interrupted")
    check = await check_stream(services.store, doomed.manifest_key, key_prefix="archive/")
    assert check.ok, check.problems
    archived = len(check.frames)
    assert 0 <= (doomed.sent - archived) / FPS <= 2.0
    assert [round(f.time_s, 3) for f in check.frames] == [
        round(relative, 3) for relative, _ in doomed.units[:archived]
    ]
    assert any(s["recovered"] for s in manifest["segments"])
    print(
        f"\nkilled worker: {archived}/{doomed.sent} frames listed; "
        f"sibling: all {sibling.sent} frames listed"
    )
    logs = service.logs()
    (recovering,) = [line for line in logs if line["event"] == "recovering"]
    assert recovering["pid"] == replacement
    assert recovering["replayed_segments"] >= 1
    claims = {line["pid"]: line["slot"] for line in logs if line["event"] == "worker_slot_claimed"}
    assert claims[replacement] == slot_of[doomed_pid]
    assert claims[sibling_pid] == slot_of[sibling_pid]
