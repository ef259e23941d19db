"""What the service counts, for Prometheus and for CloudWatch: every metric is defined here,
and the rest of the code records through the one-line functions below.

Several processes, one set of figures. Under `archiver serve` each worker holds its own bots,
so the figures live in prometheus-client's multiprocess mode: before it forks the workers,
the gunicorn master makes a folder of its own for this run (`Exporter.start`), where every
process writes its values into memory-mapped files named by its pid. Gauges are summed over
the live processes (`livesum`; the store flag takes the highest, `livemax`); when a worker
dies, gunicorn's `child_exit` hook marks it dead, which removes its gauges (its connections
and streams are gone with it) while its counters and histograms stay: totals never go back.

Who serves them: the master. It is one per task, outlives its workers, and never blocks on a
bot, so one scrape of `ARCHIVER_METRICS_PORT` (a thread of the master, never the public
port, which only the workers listen on) and one CloudWatch document per interval cover the
whole task. A single process (the app without the supervisor, as in tests) serves its own
values the same way.

CloudWatch without a sidecar: every `cloudwatch_metrics_interval_s` the exporter logs one
line in the embedded metric format (EMF) through the service's JSON logs; on ECS the awslogs
driver ships it and CloudWatch Logs turns it into metrics.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
    values,
)

from archiver.errors import ConfigError
from archiver.settings import Settings

log = structlog.get_logger(__name__)
_EMF_LOGGER = "archiver.metrics.cloudwatch"

# prometheus-client reads its folder from this variable in every process that records.
_MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
_KNOWN_EVENTS = frozenset(
    {
        "video_separate_h264.data",
        "video_separate_png.data",
        "audio_mixed_raw.data",
        "audio_separate_raw.data",
        "transcript.data",
        "transcript.partial_data",
        *(
            f"participant_events.{name}"
            for name in (
                "join",
                "leave",
                "update",
                "speech_on",
                "speech_off",
                "webcam_on",
                "webcam_off",
                "screenshare_on",
                "screenshare_off",
                "chat_message",
            )
        ),
    }
)
_UPLOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURABLE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


@dataclass(frozen=True, slots=True)
class Instruments:
    """Every metric of the service (names and meanings are listed in the README)."""

    registry: CollectorRegistry
    messages_received: Counter
    messages_refused: Counter
    connections_refused: Counter
    frames_archived: Counter
    frames_dropped: Counter
    frames_recovered: Counter
    connections: Gauge
    streams_active: Gauge
    spool_pending_bytes: Gauge
    store_unreachable: Gauge
    upload_seconds: Histogram
    upload_retries: Counter
    fallback_uploads: Counter
    manifest_writes: Counter
    segment_durable_seconds: Histogram
    notices: Counter


def _build() -> Instruments:
    registry = CollectorRegistry()
    return Instruments(
        registry=registry,
        messages_received=Counter(
            "archiver_messages_received",
            "Websocket messages parsed, by event (unknown events as `other`).",
            ["event"],
            registry=registry,
        ),
        messages_refused=Counter(
            "archiver_messages_refused",
            "Websocket messages refused before reaching a stream, by reason.",
            ["reason"],
            registry=registry,
        ),
        connections_refused=Counter(
            "archiver_connections_refused",
            "Websocket upgrades refused, by reason: `token_<why>` (401: missing, "
            "unknown_token, malformed, unknown_key, bad_signature, expired) or `unavailable` "
            "(503).",
            ["reason"],
            registry=registry,
        ),
        frames_archived=Counter(
            "archiver_frames_archived",
            "Frames listed in a manifest after the store confirmed their object.",
            ["format"],
            registry=registry,
        ),
        frames_dropped=Counter(
            "archiver_frames_dropped",
            "Frames not archived, by format and reason (the manifests' dropped_* and "
            "invalid_* counters).",
            ["format", "reason"],
            registry=registry,
        ),
        frames_recovered=Counter(
            "archiver_frames_recovered",
            "Frames replayed from the journal a crashed process left, into recovered segments "
            "or PNG batches.",
            ["format"],
            registry=registry,
        ),
        connections=Gauge(
            "archiver_connections",
            "Open bot websockets.",
            multiprocess_mode="livesum",
            registry=registry,
        ),
        streams_active=Gauge(
            "archiver_streams_active",
            "Streams whose worker runs (receiving, or waiting out its idle or leave time).",
            ["format"],
            multiprocess_mode="livesum",
            registry=registry,
        ),
        spool_pending_bytes=Gauge(
            "archiver_spool_pending_bytes",
            "Bytes in the spool that no store has confirmed yet.",
            multiprocess_mode="livesum",
            registry=registry,
        ),
        store_unreachable=Gauge(
            "archiver_store_unreachable",
            "1 while the last upload to the primary store failed (in any worker), else 0.",
            multiprocess_mode="livemax",
            registry=registry,
        ),
        upload_seconds=Histogram(
            "archiver_upload_seconds",
            "Duration of one request that stored an object in the primary store (botocore's "
            "own quick retries included).",
            buckets=_UPLOAD_BUCKETS,
            registry=registry,
        ),
        upload_retries=Counter(
            "archiver_upload_retries",
            "Store requests that failed and will be tried again.",
            registry=registry,
        ),
        fallback_uploads=Counter(
            "archiver_fallback_uploads",
            "Objects stored in the fallback store while the primary was unreachable.",
            registry=registry,
        ),
        manifest_writes=Counter(
            "archiver_manifest_writes",
            "Documents written over their previous version (manifests, session.json), by "
            "file name.",
            ["document"],
            registry=registry,
        ),
        segment_durable_seconds=Histogram(
            "archiver_segment_durable_seconds",
            "From a segment's (or PNG batch's) last frame being taken from its stream's "
            "queue to the store confirming it, by format.",
            ["format"],
            buckets=_DURABLE_BUCKETS,
            registry=registry,
        ),
        notices=Counter(
            "archiver_notices",
            "Recording-ready notices by outcome: claimed, delivered, rejected, gave_up, "
            "claimed_elsewhere, taken_over, claim_failed, abandoned.",
            ["outcome"],
            registry=registry,
        ),
    )


_instruments: Instruments | None = None


def instruments() -> Instruments:
    """The metrics of this process; in-process values unless `share_across_processes`
    was called first."""
    global _instruments
    if _instruments is None:
        _instruments = _build()
    return _instruments


def share_across_processes(folder: Path) -> None:
    """Record into `folder`, in this process and in those it forks from now on (metrics
    made before are made again)."""
    global _instruments
    os.environ[_MULTIPROCESS_DIR_VARIABLE] = str(folder)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _instruments = _build()


# Recording: one call at each boundary.


def message_received(event: str) -> None:
    instruments().messages_received.labels(event if event in _KNOWN_EVENTS else "other").inc()


def media_received(media_format: str) -> None:
    instruments().messages_received.labels(f"video_separate_{media_format}.data").inc()


def message_refused(reason: str) -> None:
    instruments().messages_refused.labels(reason).inc()


def connection_refused(reason: str) -> None:
    instruments().connections_refused.labels(reason).inc()


def frames_archived(media_format: str, frames: int) -> None:
    instruments().frames_archived.labels(media_format).inc(frames)


def frames_recovered(media_format: str, frames: int) -> None:
    instruments().frames_recovered.labels(media_format).inc(frames)


def connection_opened() -> None:
    instruments().connections.inc()


def connection_closed() -> None:
    instruments().connections.dec()


def stream_running(media_format: str, task: Any) -> None:
    """Count a stream's worker as active until its task is done."""
    gauge = instruments().streams_active.labels(media_format)
    gauge.inc()
    task.add_done_callback(lambda _: gauge.dec())


_reported_drops: weakref.WeakKeyDictionary[object, dict[str, int]] = weakref.WeakKeyDictionary()


def stream_counters(stream: object, media_format: str, *counters: Mapping[str, int]) -> None:
    """Add what a stream dropped since its last call: its counters (`dropped_<reason>`,
    and the segmenter's `invalid_<reason>` whose sum is `dropped_invalid`) only grow."""
    reported = _reported_drops.setdefault(stream, {})
    dropped = instruments().frames_dropped
    for reason, count in _drop_reasons(counters).items():
        delta = count - reported.get(reason, 0)
        if delta > 0:
            dropped.labels(media_format, reason).inc(delta)
            reported[reason] = count


def _drop_reasons(counters: tuple[Mapping[str, int], ...]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for name, count in (item for mapping in counters for item in mapping.items()):
        prefix, _, reason = name.partition("_")
        if prefix in ("dropped", "invalid") and name != "dropped_invalid":
            reasons[reason] = reasons.get(reason, 0) + count
    return reasons


def spool_pending(pending_bytes: int) -> None:
    instruments().spool_pending_bytes.set(pending_bytes)


def store_reachable(reachable: bool) -> None:
    instruments().store_unreachable.set(0 if reachable else 1)


def upload_stored(seconds: float) -> None:
    instruments().upload_seconds.observe(seconds)


def upload_retried() -> None:
    instruments().upload_retries.inc()


def fallback_used() -> None:
    instruments().fallback_uploads.inc()


def document_written(key: str) -> None:
    instruments().manifest_writes.labels(key.rsplit("/", 1)[-1]).inc()


def notice(outcome: str) -> None:
    instruments().notices.labels(outcome).inc()


def segment_durable(media_format: str, since: float) -> None:
    """`since`: `time.monotonic()` when the segment's last frame was taken in."""
    instruments().segment_durable_seconds.labels(media_format).observe(time.monotonic() - since)


# Exporting: /metrics on its own port, and CloudWatch's embedded metric format in the logs.


# The CloudWatch metric of each figure, with its unit; counters are sent as their increase
# since the previous document.
_CLOUDWATCH_GAUGES = {
    "StreamsActive": ("archiver_streams_active", "Count"),
    "Connections": ("archiver_connections", "Count"),
    "SpoolPendingBytes": ("archiver_spool_pending_bytes", "Bytes"),
    "StoreUnreachable": ("archiver_store_unreachable", "None"),
}
_CLOUDWATCH_COUNTERS = {
    "FramesArchived": ("archiver_frames_archived_total", "Count"),
    "FramesDropped": ("archiver_frames_dropped_total", "Count"),
    "UploadRetries": ("archiver_upload_retries_total", "Count"),
}


class Exporter:
    """Serves a registry at `/metrics` on its own port and logs it as EMF documents, each
    on a thread of its own (in the master, nothing else runs there)."""

    def __init__(self, settings: Settings, multiprocess_folder: bool) -> None:
        self.settings = settings
        self.multiprocess_folder = multiprocess_folder
        self.folder: Path | None = None
        self.registry: CollectorRegistry | None = None
        self.server: Any = None
        self._stop = threading.Event()
        self._emitter: threading.Thread | None = None
        self._last: dict[str, float] = {}

    def start(self) -> None:
        """Make the run's folder (before any worker is forked), then serve and emit."""
        if not self.settings.metrics_port and not self.settings.cloudwatch_metrics:
            return
        if self.multiprocess_folder:
            self.folder = Path(tempfile.mkdtemp(prefix="archiver-metrics-"))
            share_across_processes(self.folder)
            self.registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry, path=str(self.folder))  # type: ignore[no-untyped-call]
        else:
            self.registry = instruments().registry
        port = self.settings.metrics_port
        if port:
            host = self.settings.metrics_host
            try:
                self.server, _ = start_http_server(port, addr=host, registry=self.registry)
            except OSError as exc:
                self.stop()
                raise ConfigError(
                    f"cannot serve metrics on {host}:{port} (ARCHIVER_METRICS_HOST, "
                    f"ARCHIVER_METRICS_PORT): {exc}"
                ) from exc
            log.info("metrics_serving", host=host, port=port, path="/metrics")
        if self.settings.cloudwatch_metrics:
            # The documents are metrics, not messages: whatever ARCHIVER_LOG_LEVEL says.
            logging.getLogger(_EMF_LOGGER).setLevel(logging.INFO)
            self._last = _counter_totals(_totals(self.registry))
            self._emitter = threading.Thread(
                target=self._emit_forever, name="cloudwatch-metrics", daemon=True
            )
            self._emitter.start()

    def forked(self) -> None:
        """In a freshly forked worker: the metrics socket is the master's alone."""
        if self.server is not None:
            self.server.socket.close()

    def process_exited(self, pid: int) -> None:
        """A worker is gone: its gauges no longer count."""
        if self.folder is not None:
            multiprocess.mark_process_dead(pid, str(self.folder))  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        """Stop serving; send a last document; remove the run's folder."""
        self._stop.set()
        if self._emitter is not None:
            self._emitter.join()
            self.emit()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _emit_forever(self) -> None:
        while not self._stop.wait(self.settings.cloudwatch_metrics_interval_s):
            try:
                self.emit()
            except Exception:
                log.exception("cloudwatch_metrics_failed")

    def emit(self) -> None:
        """Log one EMF document: the gauges now, the counters' increase since the last."""
        assert self.registry is not None
        figures = _totals(self.registry)
        counters = _counter_totals(figures)
        document: dict[str, Any] = {"Service": self.settings.cloudwatch_service}
        for metric, (name, _) in _CLOUDWATCH_GAUGES.items():
            document[metric] = figures.get(name, 0.0)
        for metric, (name, _) in _CLOUDWATCH_COUNTERS.items():
            # Totals never go back: a dead worker's counters stay in the run's folder.
            document[metric] = counters[name] - self._last.get(name, 0.0)
        self._last = counters
        units = {**_CLOUDWATCH_GAUGES, **_CLOUDWATCH_COUNTERS}
        document["_aws"] = {
            "Timestamp": int(time.time() * 1000),
            "CloudWatchMetrics": [
                {
                    "Namespace": self.settings.cloudwatch_namespace,
                    "Dimensions": [["Service"]],
                    "Metrics": [
                        {"Name": metric, "Unit": unit} for metric, (_, unit) in units.items()
                    ],
                }
            ],
        }
        structlog.get_logger(_EMF_LOGGER).info("cloudwatch_metrics", **document)


def _counter_totals(figures: dict[str, float]) -> dict[str, float]:
    return {name: figures.get(name, 0.0) for name, _ in _CLOUDWATCH_COUNTERS.values()}


def _totals(registry: CollectorRegistry) -> dict[str, float]:
    """Each sample name's value, summed over its labels."""
    totals: dict[str, float] = {}
    for sample in _samples(registry):
        totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def _samples(registry: CollectorRegistry) -> Iterator[Any]:
    for family in registry.collect():
        yield from family.samples
