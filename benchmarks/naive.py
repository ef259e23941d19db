"""The naive receiver: what a team writes first. Each stream's access units go, decoded from
base64, into its own `ffmpeg -c copy` subprocess that cuts HLS with fMP4 segments on local
disk (no upload, no manifest, no recovery: its cost is a lower bound). One process, like the
archiver's one worker. `python -m benchmarks.naive --port P --folder DIR --fps 30`"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import re
from pathlib import Path

import orjson
from aiohttp import WSMsgType, web

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
COUNTS = web.AppKey("counts", dict)
OPTIONS = web.AppKey("options", argparse.Namespace)
_SAFE = re.compile(r"[^A-Za-z0-9_-]")


async def ffmpeg(folder: Path, fps: float, segment_s: float) -> asyncio.subprocess.Process:
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    return await asyncio.create_subprocess_exec(
        "ffmpeg", "-hide_banner", "-loglevel", "error",
        "-f", "h264", "-framerate", str(fps), "-i", "pipe:0",
        "-c", "copy",
        "-f", "hls", "-hls_time", str(segment_s), "-hls_segment_type", "fmp4",
        "-hls_list_size", "0", "-hls_playlist_type", "event",
        "-hls_fmp4_init_filename", "init.mp4",
        "-hls_segment_filename", str(folder / "%05d.m4s"),
        str(folder / "index.m3u8"),
        stdin=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def websocket(request: web.Request) -> web.WebSocketResponse:
    counts, options = request.app[COUNTS], request.app[OPTIONS]
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    counts["connections"] += 1
    processes: dict[str, asyncio.subprocess.Process] = {}
    try:
        async for message in ws:
            if message.type is not WSMsgType.TEXT:
                continue
            counts["messages"] += 1
            try:
                data = orjson.loads(message.data)["data"]
                inner = data["data"]
                if "buffer" not in inner:
                    continue
                unit = base64.b64decode(inner["buffer"], validate=True)
                name = "/".join(
                    _SAFE.sub("_", str(part))
                    for part in (
                        data["bot"]["id"],
                        data["recording"]["id"],
                        inner["participant"]["id"],
                        inner["type"],
                    )
                )
            except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error):
                counts["bad"] += 1
                continue
            process = processes.get(name)
            if process is None:
                process = await ffmpeg(options.folder / name, options.fps, options.segment_s)
                processes[name] = process
                counts["streams_open"] += 1
            assert process.stdin is not None
            process.stdin.write(unit)
            await process.stdin.drain()
            counts["frames"] += 1
    finally:
        for process in processes.values():
            assert process.stdin is not None
            process.stdin.close()
        for process in processes.values():
            if await process.wait() != 0:
                counts["ffmpeg_failures"] += 1
            counts["streams_open"] -= 1
        counts["connections"] -= 1
    return ws


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[COUNTS])


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--segment-s", type=float, default=10.0)
    application = web.Application()
    application[OPTIONS] = parser.parse_args()
    application[COUNTS] = dict.fromkeys(
        ("connections", "messages", "frames", "bad", "streams_open", "ffmpeg_failures"), 0
    )
    application.add_routes(
        [web.get("/ws", websocket), web.get("/stats", stats), web.get("/healthz", healthz)]
    )
    web.run_app(
        application,
        host="127.0.0.1",
        port=application[OPTIONS].port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
