"""Structured logs: JSON lines for machines, readable lines on a terminal, no secrets."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

_SECRET_QUERY = re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE)
_SECRET_KEYS = frozenset(
    {"token", "auth_tokens", "token_keys", "authorization", "password", "secret"}
)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Last line of defence: no token value leaves the process, whoever logs it."""
    for key, value in event.items():
        if key in _SECRET_KEYS:
            event[key] = "[redacted]"
        elif isinstance(value, str) and "token=" in value.lower():
            event[key] = _SECRET_QUERY.sub(r"\1[redacted]", value)
    return event


def _orjson_dumps(event: Any, **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


def _add_pid(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["pid"] = os.getpid()
    return event


def configure(level: str = "info", log_format: str = "auto", pid: bool = False) -> None:
    """Route structlog and the standard library's loggers (aiohttp, botocore) to stdout;
    with `pid`, each line names the process that wrote it (one of several workers)."""
    console = log_format == "console" or (log_format == "auto" and sys.stdout.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redact,
        *([_add_pid] if pid else []),
    ]
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer()
        if console
        else structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Per-request lines come from our own access logger, which leaves query strings out.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
