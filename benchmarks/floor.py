"""The floor: the least any receiver must do per message. An aiohttp websocket server that
parses each message's JSON with orjson and decodes its base64 buffer, and keeps nothing.
`--workers N` forks N server processes accepting on one listening socket, as the archiver's
workers do; each answers `/stats` with its own counts and its number.
`python -m benchmarks.floor --port P [--workers N]`"""

from __future__ import annotations

import argparse
import base64
import binascii
import multiprocessing
import signal
import socket

import orjson
from aiohttp import WSMsgType, web

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
COUNTS = web.AppKey("counts", dict)


async def websocket(request: web.Request) -> web.WebSocketResponse:
    counts = request.app[COUNTS]
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    counts["connections"] += 1
    async for message in ws:
        if message.type is not WSMsgType.TEXT:
            continue
        counts["messages"] += 1
        try:
            event = orjson.loads(message.data)
            buffer = event["data"]["data"].get("buffer")
            if buffer is not None:
                counts["decoded_bytes"] += len(base64.b64decode(buffer, validate=True))
                counts["frames"] += 1
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, binascii.Error):
            counts["bad"] += 1
    counts["connections"] -= 1
    return ws


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[COUNTS])


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


def app(worker: int) -> web.Application:
    application = web.Application()
    application[COUNTS] = dict.fromkeys(
        ("connections", "messages", "frames", "decoded_bytes", "bad"), 0
    )
    application[COUNTS]["worker"] = worker
    application.add_routes(
        [web.get("/ws", websocket), web.get("/stats", stats), web.get("/healthz", healthz)]
    )
    return application


def serve(sock: socket.socket, worker: int) -> None:
    web.run_app(app(worker), sock=sock, access_log=None, print=None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    sock = socket.create_server(("127.0.0.1", args.port), backlog=128)
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=serve, args=(sock, n)) for n in range(args.workers)]
    for child in children:
        child.start()

    def stop(signum: int, frame: object) -> None:
        for child in children:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    for child in children:
        child.join()


if __name__ == "__main__":
    main()
