"""Metrics of the real service: Prometheus on its own port, summed over the workers, and the
same figures as CloudWatch embedded-metric documents in the JSON logs."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from archiver.tools.simulator import media_message
from tests.conftest import ServiceFactory
from tests.faults.conftest import ServiceProcess, ServiceProcesses, free_port
from tests.faults.test_faults import wait_for_manifest
from tests.faults.test_workers import Bot, bots_on

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
EMF_METRICS = {
    "StreamsActive",
    "Connections",
    "SpoolPendingBytes",
    "StoreUnreachable",
    "FramesArchived",
    "FramesDropped",
    "UploadRetries",
}


async def scrape(port: int) -> Samples:
    """Every sample of /metrics, by name and labels."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the samples carrying `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


async def until(
    port: int, check: Callable[[Samples], Awaitable[bool] | bool], timeout_s: float = 60
) -> Samples:
    """Scrape until `check` holds; the last scrape."""
    async with asyncio.timeout(timeout_s):
        while True:
            samples = await scrape(port)
            outcome = check(samples)
            if outcome if isinstance(outcome, bool) else await outcome:
                return samples
            await asyncio.sleep(0.1)


async def public_status(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status


def bad_base64(bot: Bot) -> str:
    """A frame of the bot's stream whose payload is not base64: dropped by its worker."""
    relative = bot.units[bot.sent - 1][0] + 0.01
    message = media_message(b"", relative, bot.start, "webcam", 100, bot.name, "rec-1")
    message["data"]["data"]["buffer"] = "%%% not base64 %%%"
    return orjson.dumps(message).decode()


async def archived_in_manifests(services: ServiceProcesses) -> int:
    """Frames every stream manifest in the bucket lists as archived."""
    keys = await services.store.list_keys("")
    total_frames = 0
    for key in keys:
        if key.endswith(("/h264/manifest.json", "/png/manifest.json")):
            raw = await services.store.get(key)
            assert raw is not None
            total_frames += orjson.loads(raw)["counters"]["archived"]
    return total_frames


async def test_metrics_of_every_worker_on_their_own_port_and_in_the_logs(
    services: ServiceProcesses,
) -> None:
    port = free_port()
    service = await services.start(
        workers=2,
        metrics_port=port,
        cloudwatch_metrics="true",
        cloudwatch_metrics_interval_s=0.3,
        cloudwatch_service="test-archiver",
    )
    await service.wait_for_workers(2)
    assert await public_status(f"http://127.0.0.1:{service.port}/metrics") == 404
    idle = await scrape(port)
    assert total(idle, "archiver_connections") == 0
    assert total(idle, "archiver_streams_active") == 0

    sent = 0
    async with bots_on(service, 2) as held:
        bots = list(held.values())
        for bot in bots:
            while bot.sent < len(bot.units):
                await bot.send_next()
        await bots[0].ws.send_str(bad_base64(bots[0]))
        await bots[0].ws.send_str("not json")
        sent = sum(bot.sent for bot in bots)
        busy = await until(
            port,
            lambda s: (
                total(s, "archiver_connections") == 2 and total(s, "archiver_streams_active") == 2
            ),
        )
        assert total(busy, "archiver_streams_active", format="h264") == 2
        await until(port, lambda s: total(s, "archiver_frames_dropped_total") >= 1)
        async with asyncio.timeout(30):
            while not any(line.get("Connections") == 2 for line in emf_lines(service)):  # noqa: ASYNC110 (a log file)
                await asyncio.sleep(0.1)
    for bot in bots:
        await wait_for_manifest(services, bot.manifest_key, "complete")

    async def settled(samples: Samples) -> bool:
        return (
            total(samples, "archiver_connections") == 0
            and total(samples, "archiver_streams_active") == 0
            and total(samples, "archiver_frames_archived_total")
            == await archived_in_manifests(services)
        )

    done = await until(port, settled)
    archived = await archived_in_manifests(services)
    assert archived >= sent
    assert total(done, "archiver_frames_archived_total", format="h264") == archived
    assert total(done, "archiver_frames_dropped_total") == 1
    assert total(done, "archiver_frames_dropped_total", format="h264", reason="bad_base64") == 1
    assert total(done, "archiver_messages_refused_total", reason="bad_json") == 1
    # Every frame the bots sent (the extra connections' first frames too), and the bad one.
    assert (
        total(done, "archiver_messages_received_total", event="video_separate_h264.data")
        == archived + 1
    )
    assert total(done, "archiver_upload_seconds_count") >= 2 * len(bots)
    assert total(done, "archiver_segment_durable_seconds_count", format="h264") >= len(bots)
    assert total(done, "archiver_manifest_writes_total", document="manifest.json") >= len(bots)
    assert total(done, "archiver_spool_pending_bytes") == 0
    assert total(done, "archiver_store_unreachable") == 0

    # The same figures as CloudWatch embedded-metric documents, written by the master.
    assert await service.stop() == 0
    documents = emf_lines(service)
    assert len(documents) >= 2
    assert {line["pid"] for line in documents} == {service.process.pid}
    for document in documents:
        check_emf(document)
    # Two bots held (connections opened while looking for a second worker may show too).
    assert any(d["Connections"] == 2 for d in documents)
    assert max(d["StreamsActive"] for d in documents) >= 2
    assert documents[-1]["StreamsActive"] == documents[-1]["Connections"] == 0
    # Counters go out as their increase since the previous document: they add up.
    assert sum(d["FramesArchived"] for d in documents) == archived
    assert sum(d["FramesDropped"] for d in documents) == 1


def emf_lines(service: ServiceProcess) -> list[dict[str, Any]]:
    return [line for line in service.logs() if line["event"] == "cloudwatch_metrics"]


def check_emf(document: dict[str, Any]) -> None:
    """A valid embedded-metric-format document, as CloudWatch Logs reads it."""
    aws = document["_aws"]
    assert isinstance(aws["Timestamp"], int)
    (directive,) = aws["CloudWatchMetrics"]
    assert directive["Namespace"] == "RecallArchiver"
    assert directive["Dimensions"] == [["Service"]]
    assert document["Service"] == "test-archiver"
    names = {metric["Name"] for metric in directive["Metrics"]}
    assert names == EMF_METRICS
    for metric in directive["Metrics"]:
        assert metric["Unit"] in ("Count", "Bytes", "None")
        value = document[metric["Name"]]
        assert isinstance(value, int | float)
        assert value >= 0


async def test_a_single_process_serves_its_own_metrics(service: ServiceFactory) -> None:
    port = free_port()
    running = await service(metrics_port=port)
    before = await scrape(port)
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        await ws.send_str("not json")
        await until(port, lambda s: total(s, "archiver_connections") == 1)
    after = await until(port, lambda s: total(s, "archiver_connections") == 0)
    refused = "archiver_messages_refused_total"
    assert total(after, refused, reason="bad_json") == total(before, refused, reason="bad_json") + 1
    assert await public_status(f"{running.http}/metrics") == 404


async def metrics_answer(address: str, port: int) -> bool:
    """Whether /metrics answers on `address`."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{address}:{port}/metrics") as response,
        ):
            return response.status == 200
    except aiohttp.ClientConnectionError:
        return False


async def test_the_metrics_port_listens_on_its_own_address(service: ServiceFactory) -> None:
    # By default this machine only, whatever the public port listens on.
    default = free_port()
    await service(host="127.0.0.2", metrics_port=default)
    assert await metrics_answer("127.0.0.1", default)
    assert not await metrics_answer("127.0.0.2", default)
    chosen = free_port()
    await service(host="127.0.0.1", metrics_host="127.0.0.2", metrics_port=chosen)
    assert await metrics_answer("127.0.0.2", chosen)
    assert not await metrics_answer("127.0.0.1", chosen)


async def until_journaled(service: ServiceProcess, pid: int, size: int) -> None:
    """Until the journal in worker `pid`'s slot holds at least `size` bytes."""
    (slot,) = [
        line["slot"]
        for line in service.logs()
        if line["event"] == "worker_slot_claimed" and line["pid"] == pid
    ]
    journal = service.slot(slot) / "journal"
    async with asyncio.timeout(10):
        while True:
            if sum(f.stat().st_size for f in journal.rglob("*") if f.is_file()) >= size:
                return
            await asyncio.sleep(0.05)


async def test_a_killed_workers_gauges_leave_the_sum_and_its_counters_stay(
    services: ServiceProcesses,
) -> None:
    port = free_port()
    service = await services.start(workers=2, metrics_port=port, batch_window_s=0)
    await service.wait_for_workers(2)
    async with bots_on(service, 2) as held:
        (doomed_pid, doomed), (sibling_pid, sibling) = sorted(held.items())
        await until(port, lambda s: total(s, "archiver_connections") == 2)
        before = await until(
            port, lambda s: total(s, "archiver_messages_received_total") >= len(held)
        )
        # A second frame agrees on the stream's start, so both are journaled; then the kill.
        await doomed.send_next()
        await until_journaled(service, doomed_pid, sum(len(data) for _, data in doomed.units[:2]))
        os.kill(doomed_pid, signal.SIGKILL)
        after = await until(
            port,
            lambda s: (
                total(s, "archiver_connections") == 1 and total(s, "archiver_streams_active") == 1
            ),
        )
        assert sibling_pid in service.worker_pids()
        assert total(after, "archiver_messages_received_total") >= total(
            before, "archiver_messages_received_total"
        )
        await sibling.send_next()
    await until(port, lambda s: total(s, "archiver_connections") == 0)
    # Its replacement replays the frame it had journaled.
    await until(port, lambda s: total(s, "archiver_frames_recovered_total", format="h264") == 2)
