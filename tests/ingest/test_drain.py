"""Shutdown: bots are told to reconnect (1012), every frame received is written out."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from datetime import UTC, datetime

import aiohttp
import orjson

from archiver.consumers.decode_check import check_stream
from archiver.ingest.server import STATE
from archiver.tools.simulator import Simulation, encode_stream, media_message
from tests.conftest import TOKEN, ServiceFactory


def prepared(url: str, seconds: float = 3, fps: float = 10) -> tuple[Simulation, list[str]]:
    sim = Simulation(url=url, participants=1, seconds=seconds, fps=fps)
    (stream,) = sim.plan()
    start = datetime.now(UTC)
    texts = [
        orjson.dumps(
            media_message(data, t, start, "webcam", 100, sim.bot_id, sim.recording_id)
        ).decode()
        for t, data, _ in encode_stream(stream, seconds, fps, keyframe_interval_s=1)
    ]
    return sim, texts


def manifest_key(sim: Simulation) -> str:
    return f"{sim.bot_id}/{sim.recording_id}/participants/100/webcam/h264/manifest.json"


async def test_shutdown_closes_websockets_with_1012_and_writes_every_frame(
    service: ServiceFactory,
) -> None:
    running = await service()
    sim, texts = prepared(running.url)
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        for text in texts[:20]:
            await ws.send_str(text)
        streams = running.app[STATE].writers.streams.streams
        async with asyncio.timeout(10):  # until the service has read all 20
            while sum(stream.received for stream in streams.values()) < 20:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        shutdown = asyncio.create_task(running.runner.cleanup())
        closing = await ws.receive()
        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert closing.data == aiohttp.WSCloseCode.SERVICE_RESTART
        await shutdown
    check = await check_stream(running.store, manifest_key(sim), key_prefix="archive/")
    assert check.ok, check.problems
    assert check.manifest["status"] == "complete"
    assert len(check.frames) == 20


async def test_sigterm_mid_stream_loses_nothing_and_exits_before_the_deadline(
    s3_endpoint: str, bucket: str, unused_tcp_port: int, s3
) -> None:
    env = {
        **os.environ,
        "ARCHIVER_AUTH_TOKENS": TOKEN,
        "ARCHIVER_STORE": f"s3://{bucket}/archive",
        "ARCHIVER_S3_ENDPOINT_URL": s3_endpoint,
        "ARCHIVER_HOST": "127.0.0.1",
        "ARCHIVER_PORT": str(unused_tcp_port),
        "ARCHIVER_DRAIN_DEADLINE_S": "20",
        "ARCHIVER_LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "archiver", "serve", env=env, stdout=asyncio.subprocess.PIPE
    )
    base = f"127.0.0.1:{unused_tcp_port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(f"http://{base}/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            url = f"ws://{base}/ws?token={TOKEN}"
            sim, texts = prepared(url)
            async with session.ws_connect(url) as ws:
                for text in texts[:25]:
                    await ws.send_str(text)
                await asyncio.sleep(0.3)  # mid-stream; /readyz answers from either worker
                signalled = time.monotonic()
                process.send_signal(signal.SIGTERM)
                closing = await ws.receive()
                assert closing.data == aiohttp.WSCloseCode.SERVICE_RESTART
        assert await asyncio.wait_for(process.wait(), 20) == 0
        assert time.monotonic() - signalled < 20
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stdout is not None
    logged = (await process.stdout.read()).decode()
    assert TOKEN not in logged
    assert '"event":"draining"' in logged
    key = f"archive/{manifest_key(sim)}"
    manifest = orjson.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert manifest["status"] == "complete"
    assert sum(s["frames"] for s in manifest["segments"]) == 25


async def test_frames_sent_until_the_bot_sees_the_close_are_archived(
    service: ServiceFactory,
) -> None:
    """A bot may send until it has seen the close frame (RFC 6455): the service reads and
    archives until the bot's close reply, and the bot sees a clean 1012, not 1006."""
    running = await service()
    sim, texts = prepared(running.url, seconds=20, fps=15)
    sent = 0
    async with aiohttp.ClientSession() as session, session.ws_connect(running.url) as ws:
        closing = asyncio.create_task(ws.receive())
        for text in texts[:30]:
            await ws.send_str(text)
        shutdown = asyncio.create_task(running.runner.cleanup())
        sent = 30
        # Keep sending as fast as the socket takes it until the close frame is seen.
        while not closing.done() and sent < len(texts):
            await ws.send_str(texts[sent])
            sent += 1
            await asyncio.sleep(0)
        message = await closing
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == aiohttp.WSCloseCode.SERVICE_RESTART
        await shutdown
    assert 30 < sent < len(texts)
    check = await check_stream(running.store, manifest_key(sim), key_prefix="archive/")
    assert check.ok, check.problems
    assert len(check.frames) == sent, {k: v for k, v in check.manifest["counters"].items() if v}
