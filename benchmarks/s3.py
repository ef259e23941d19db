"""moto's S3 server, in its own process, writing one JSON line per request it answered:
when the answer was complete, method, key, status and body size. The archiver benchmark
counts requests and times uploads from it. `python -m benchmarks.s3 --port P --log FILE`"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server


class RequestLog:
    """WSGI middleware: answer, then append the request's line."""

    def __init__(self, app: Callable[..., Iterable[bytes]], path: str) -> None:
        self.app = app
        self.out = open(path, "ab", buffering=0)  # noqa: SIM115 (open for the process's life)
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        status: list[str] = []

        def remember(code: str, headers: Any, exc_info: Any = None) -> Any:
            status.append(code)
            return start_response(code, headers, exc_info)

        result = self.app(environ, remember)
        try:
            body = list(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        line = {
            "t": time.time(),
            "method": environ["REQUEST_METHOD"],
            "path": environ.get("PATH_INFO", ""),
            "query": environ.get("QUERY_STRING", ""),
            "status": int(status[0].split()[0]) if status else 0,
            "bytes_in": int(environ.get("CONTENT_LENGTH") or 0),
        }
        with self.lock:
            self.out.write(orjson.dumps(line) + b"\n")
        return body


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    app = RequestLog(DomainDispatcherApplication(create_backend_app), args.log)
    make_server("127.0.0.1", args.port, app, threaded=True).serve_forever()


if __name__ == "__main__":
    main()
