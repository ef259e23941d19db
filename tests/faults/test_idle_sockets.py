"""Unauthenticated sockets cannot hold a task: connections that never finish their request
headers, or sit idle between requests, are closed; those beyond the cap make room; the
health check and the bots never wait behind them; the worker never runs out of descriptors."""

from __future__ import annotations

import asyncio
import random
import resource
import threading
import time
from dataclasses import dataclass, field

import aiohttp
import pytest

from archiver.consumers.decode_check import check_stream
from archiver.settings import Settings
from tests.faults.conftest import ServiceProcesses
from tests.faults.test_faults import wait_for_manifest
from tests.faults.test_workers import FPS, Bot, encode

HEADER_TIMEOUT_S = 2.0
IDLE_HTTP_TIMEOUT_S = 4.0
"""Both shorter than the defaults, to keep the test short; the idle one the longer, so that
the header timeout is what closes a connection that never sent a request (with aiohttp 3.14
the idle one would too, from the connection's start)."""
MAX_PENDING = Settings.model_fields["max_pending_connections"].default
SLACK_S = 1.5
"""Timers, scheduling and two busy CPUs: a socket counts as closed in time within this."""

KINDS = {
    # Connected, nothing sent.
    "idle": 1100,
    # A partial request line, nothing more.
    "slow_header": 200,
    # The request line, then one header byte every half second: never a whole header.
    "trickle": 40,
    # Connected, then FIN (shutdown for writing) without a request.
    "half_open": 50,
    # One whole /healthz on a keep-alive connection, then idle.
    "keepalive": 40,
}


@dataclass
class Held:
    kind: str
    opened: float
    closed: float | None = None
    answered: float | None = None
    refused: bool = False
    """The connection could not even be opened (never counted as held)."""


@dataclass
class Flood:
    """The sockets, opened and watched from a thread of their own (its own event loop), so
    that neither the bots nor the health probes of the test's loop wait behind them."""

    port: int
    held: list[Held] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    opened_all: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # noqa: BLE001 (the test's thread raises it)
            self.error = exc
        finally:
            self.opened_all.set()
            self.done.set()

    async def _run(self) -> None:
        order = [kind for kind, count in KINDS.items() for _ in range(count)]
        # Interleaved, so every kind meets the cap.
        random.Random(7).shuffle(order)
        opening = asyncio.Semaphore(64)
        watching = []
        for kind in order:
            async with opening:
                watching.append(await self._open(kind))
        self.opened_all.set()
        await asyncio.gather(*[w for w in watching if w is not None])

    async def _open(self, kind: str) -> asyncio.Task[None] | None:
        held = Held(kind, time.monotonic())
        self.held.append(held)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            held.refused = True
            return None
        return asyncio.create_task(self._watch(held, reader, writer))

    async def _watch(
        self, held: Held, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        deadline = HEADER_TIMEOUT_S + IDLE_HTTP_TIMEOUT_S + 3 * SLACK_S
        trickling: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout(deadline):
                if held.kind == "slow_header":
                    writer.write(b"GET /heal")
                elif held.kind == "trickle":
                    trickling = asyncio.create_task(self._trickle(writer))
                elif held.kind == "half_open":
                    writer.write_eof()
                elif held.kind == "keepalive":
                    writer.write(b"GET /healthz HTTP/1.1\r\nHost: archiver\r\n\r\n")
                    await reader.readuntil(b"\r\n\r\n")
                    held.answered = time.monotonic()
                while await reader.read(65536):
                    pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except TimeoutError:
            return  # Still open: `closed` stays None.
        finally:
            if trickling is not None:
                trickling.cancel()
            writer.close()
        held.closed = time.monotonic()

    @staticmethod
    async def _trickle(writer: asyncio.StreamWriter) -> None:
        writer.write(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        while True:
            await asyncio.sleep(0.5)
            writer.write(b"x")


async def probe_healthz(port: int, timeout_s: float = 5) -> float:
    """One health check as a load balancer makes it: a new connection, `/healthz`; the
    seconds until its whole answer, `timeout_s` if there was none by then, or infinity if
    the answer was not 200."""
    began = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(
                    b"GET /healthz HTTP/1.1\r\nHost: archiver\r\nConnection: close\r\n\r\n"
                )
                answer = await reader.read()
            finally:
                writer.close()
    except TimeoutError:
        return timeout_s
    except OSError:
        return float("inf")
    if not answer.startswith(b"HTTP/1.1 200"):
        return float("inf")
    return time.monotonic() - began


async def stream(bot: Bot, began: float) -> None:
    """Every frame of the bot at its time, from `began`."""
    while bot.sent < len(bot.units):
        await bot.send_next()
        await asyncio.sleep(max(0, began + bot.sent / FPS - time.monotonic()))


@pytest.fixture
def many_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = sum(KINDS.values()) + 512
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(f"this test opens {wanted} sockets; the hard limit is {hard}: raise it")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.mark.usefixtures("many_open_files")
async def test_idle_and_slow_sockets_cannot_hold_a_task(services: ServiceProcesses) -> None:
    service = await services.start(
        open_files=1024,
        header_timeout_s=HEADER_TIMEOUT_S,
        idle_http_timeout_s=IDLE_HTTP_TIMEOUT_S,
    )
    units = await asyncio.to_thread(encode)
    probes: list[tuple[float, float]] = []
    """(when, relative to the flood's start; seconds to the whole answer)"""
    peak_files = 0
    flood = Flood(service.port)
    flood_began = time.monotonic()
    async with aiohttp.ClientSession() as session:
        first = Bot("bot-before", await session.ws_connect(service.url), units=units)
        streaming = [asyncio.create_task(stream(first, time.monotonic()))]
        stop_probing = asyncio.Event()

        async def probe_forever() -> None:
            nonlocal peak_files
            while not stop_probing.is_set():
                when = time.monotonic() - flood_began
                probes.append((when, await probe_healthz(service.port)))
                peak_files = max(peak_files, service.worker_open_files())
                await asyncio.sleep(0.1)

        await asyncio.sleep(1.0)
        flooding = threading.Thread(target=flood.run, daemon=True)
        flood_began = time.monotonic()
        probing = asyncio.create_task(probe_forever())
        flooding.start()
        # A bot arriving in the middle of the flood is taken at once and archived whole.
        await asyncio.sleep(0.3)
        connecting = time.monotonic()
        second = Bot("bot-during", await session.ws_connect(service.url), units=units[: 5 * FPS])
        second_connect_s = time.monotonic() - connecting
        streaming.append(asyncio.create_task(stream(second, time.monotonic())))
        await asyncio.to_thread(flood.opened_all.wait, 30)
        opened_in_s = time.monotonic() - flood_began
        await asyncio.to_thread(flood.done.wait, 30)
        flooding.join(timeout=5)
        assert flood.error is None, repr(flood.error)
        await asyncio.gather(*streaming)
        stop_probing.set()
        await probing
        for bot in (first, second):
            await bot.ws.close()
    for bot in (first, second):
        await wait_for_manifest(services, bot.manifest_key, "complete")
        check = await check_stream(services.store, bot.manifest_key, key_prefix="archive/")
        assert check.ok, check.problems
        assert [round(f.time_s, 3) for f in check.frames] == [
            round(relative, 3) for relative, _ in bot.units
        ]
    assert await service.stop() == 0  # Its last `pending_connections_shed` line: the totals.

    held = [h for h in flood.held if not h.refused]
    still_open = [h for h in held if h.closed is None]
    late = []
    for h in held:
        if h.closed is None:
            continue
        if h.kind == "keepalive":
            assert h.answered is not None, "a keep-alive socket got no answer"
            if h.closed - h.answered > IDLE_HTTP_TIMEOUT_S + SLACK_S:
                late.append(h)
        elif h.closed - h.opened > HEADER_TIMEOUT_S + SLACK_S:
            late.append(h)
    logs = service.logs()
    shed = [line for line in logs if line["event"] == "pending_connections_shed"]
    lasted = {
        kind: max((h.closed - h.opened for h in held if h.kind == kind and h.closed), default=0)
        for kind in KINDS
    }
    worst_at, worst = max(probes, key=lambda probe: probe[1])
    totals = shed[-1] if shed else {}
    print(
        f"\n{len(held)} sockets opened by the client ({len(flood.held) - len(held)} could not "
        f"be), all within {opened_in_s:.1f} s: "
        + ", ".join(f"{kind} {count}" for kind, count in KINDS.items())
        + f"\nclosed by the server: {len(held) - len(still_open)}, still open: "
        f"{len(still_open)}, late: {len(late)}; the longest held, by kind: "
        + ", ".join(f"{kind} {s:.1f} s" for kind, s in lasted.items())
        + f"\nserver: {', '.join(f'{k} {totals.get(k)}' for k in SHED_COUNTS)} "
        f"in {len(shed)} log lines; worker's open files at most {peak_files} "
        f"(ulimit 1024, cap {MAX_PENDING})"
        f"\n/healthz: {len(probes)} probes, worst {worst:.3f} s ({worst_at:.1f} s into the "
        f"flood); the second bot connected in {second_connect_s:.3f} s; both bots archived "
        f"whole ({len(first.units)} + {len(second.units)} frames)"
    )
    assert not still_open, f"{len(still_open)} sockets never closed by the server"
    assert not late, f"{len(late)} closed late: {late[:5]}"
    assert worst < 1.0
    assert second_connect_s < 1.0
    assert peak_files < 1024
    assert not [line for line in logs if line["event"] == "accept_paused"]
    # Counted, and logged without flooding the log: one line at once, one every 10 s.
    assert 1 <= len(shed) <= 4
    assert totals["header_timeouts"] > 0
    assert totals["evicted_waiting"] > 0


SHED_COUNTS = ("header_timeouts", "evicted_waiting", "evicted_idle", "refused")
