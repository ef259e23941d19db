"""The archiver beside a floor and a naive receiver, on this machine, in one run.

    python -m benchmarks.run [--seconds 30 --realtime-bots 1 --fast-bots 2 --json out.json]
                             [--workers 1,2] [--half-rate] [--meeting-hours 2]
                             [--audio] [--meeting-audio]

Each receiver runs as its own process tree on a loopback port and gets the same load from
`archiver.tools.loadgen` (run in this process): bots of `--participants` webcams at `--fps`,
replaying one clip encoded before the clock starts.

- real time: `--realtime-bots` bots for `--seconds`. Server CPU per message (utime + stime
  of the receiver's whole process tree, ffmpeg children included, from /proc, from the first
  send until the receiver has handled every frame), and memory per stream (the tree's
  peak RSS and PSS under load minus its RSS and PSS idle before, over the streams).
  For the archiver also: upload latency, S3 requests, and every frame read back.
- fast: `--fast-bots` bots per worker sending as fast as the receiver reads (TCP
  backpressure). The rate is frames over the time from the first send until the receiver
  has handled the last (archiver: every stream's final manifest stored and the spool empty).
- workers: the floor and the archiver run with each count in `--workers` (the first count
  runs everything above; the others the fast run), the naive receiver (one process and its
  ffmpeg children) once. Besides each tree's CPU share (its CPU seconds over the wall
  seconds: cores kept busy), the machine's, generator and S3 server included.
- half rate (`--half-rate`): after each of the archiver's fast runs, real time with as many
  bots as make about half the rate it reached, for the segment-durable latency.
- meeting (`--meeting-hours`): one bot of `--meeting-streams` webcams sends that much video
  as fast as the archiver reads, and every S3 request is counted by kind.
- audio (`--audio`): the archiver's real-time and fast runs again with each participant's
  audio instead of their webcam (`--audio-chunk-ms` chunks of voice-like PCM): CPU per
  chunk beside CPU per video message, every chunk listed. With `--meeting-audio`, the
  meeting again with audio: S3 requests per participant-hour beside the video's.

The archiver (`archiver serve`) stores into moto's S3 server, run in a process of its own
(`benchmarks.s3`) that logs each request it answered. Upload latency: for each segment, the
time its PUT was answered minus the time the load generator finished sending the segment's
last frame (the manifest gives each segment's first frame and frame count). That includes
the wait for the next frame, which is what closes a segment (1/fps), the spool's fsync and
the upload.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import boto3
import orjson

from archiver.consumers.decode_check import check_stream
from archiver.layout import RecordingId, StreamId
from archiver.settings import Settings
from archiver.store import S3Store
from archiver.tools.loadgen import Clip, Load, LoadReport, encode_audio_clip, encode_clip, run_load
from benchmarks import procs

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "benchmark-token-0123456789abcdef01"  # noqa: S105 (a local benchmark's)
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "benchmark",
    "AWS_SECRET_ACCESS_KEY": "benchmark",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "benchmark"
PREFIX = "archive"
RECEIVERS = ("floor", "naive", "archiver")
CPU_TARGET = 0.6
SEGMENT_TARGET_S: float = Settings.model_fields["segment_target_s"].default
"""The archiver's default, which the benchmark keeps."""
# AWS list prices, us-east-1, as published in November 2026 (not fetched by this script).
PRICES: dict[str, Any] = {
    "date": "2026-11",
    "region": "us-east-1",
    "s3_put_per_1000": 0.005,
    "s3_get_per_1000": 0.0004,
    "fargate_vcpu_hour": 0.04048,
    "fargate_gb_hour": 0.004445,
    "fargate_gb_per_vcpu": 2.0,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Process:
    """A receiver (or the S3 server) as a child process with its output in a file."""

    def __init__(self, name: str, args: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                args,
                cwd=workdir,
                env={**os.environ, "PYTHONPATH": path, **env},
                stdout=log,
                stderr=log,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


async def wait_http(url: str, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s), aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


async def get_json(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        body: dict[str, Any] = await response.json()
        return body


class MemorySampler(threading.Thread):
    """The tree's peak RSS and PSS while the load runs."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peak = procs.Memory(0, 0, 0)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            sample = procs.memory(self.pid)
            if sample.rss_bytes > self.peak.rss_bytes:
                self.peak = sample

    def stop(self) -> procs.Memory:
        self.stopped.set()
        self.join()
        return self.peak


Answer = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Receiver:
    """A running receiver's process tree, and how to ask each of its workers how far it got:
    each request opens a connection of its own, which the kernel hands to one of them."""

    name: str
    process: Process
    base_url: str
    workers: int
    stats_path: str
    worker_field: str | None
    """The field of an answer that names its worker (None: one process)."""
    work_field: str
    """A counter of what each worker did: how the bots were spread over the workers."""
    idle: Callable[[Answer], bool]
    counts_frames: bool
    """Whether answers count frames (floor, naive): then every frame sent must be counted."""

    @property
    def ws_url(self) -> str:
        return f"ws{self.base_url.removeprefix('http')}/ws?token={TOKEN}"

    async def ask_every_worker(
        self, finished: Callable[[list[Answer]], bool], timeout_s: float = 900.0
    ) -> list[Answer]:
        """Ask until every worker has answered and their latest answers say `finished`."""
        latest: dict[Any, Answer] = {}
        async with asyncio.timeout(timeout_s):
            while True:
                answer = await get_json(self.base_url + self.stats_path)
                latest[answer[self.worker_field] if self.worker_field else 0] = answer
                if len(latest) >= self.workers:
                    answers = [latest[worker] for worker in sorted(latest)]
                    if finished(answers):
                        return answers
                await asyncio.sleep(0.02)


async def measure(receiver: Receiver, load: Load, clip: Clip) -> tuple[dict[str, Any], LoadReport]:
    """Send `load`, wait until every worker has handled it, and measure the receiver."""
    before = await receiver.ask_every_worker(lambda answers: all(map(receiver.idle, answers)))
    frames_before = sum(answer.get("frames", 0) for answer in before)
    pid = receiver.process.pid
    idle = procs.memory(pid)
    sampler = MemorySampler(pid)
    cpu_before = procs.cpu_s(pid)
    machine_before = procs.machine_cpu_s()
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    sampler.start()
    began = time.monotonic()
    report = await run_load(load, clip)
    sent_s = time.monotonic() - began

    def finished(answers: list[Answer]) -> bool:
        handled = sum(answer.get("frames", 0) for answer in answers) - frames_before
        done = all(map(receiver.idle, answers))
        return done and (not receiver.counts_frames or handled >= report.frames)

    after = await receiver.ask_every_worker(finished)
    elapsed = time.monotonic() - began
    cpu = procs.cpu_s(pid) - cpu_before
    machine_busy, machine_all = (
        now - then for now, then in zip(procs.machine_cpu_s(), machine_before, strict=True)
    )
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    peak = sampler.stop()
    streams = load.bots * load.participants
    generator_cpu = (self_after.ru_utime + self_after.ru_stime) - (
        self_before.ru_utime + self_before.ru_stime
    )
    field = receiver.work_field
    result: dict[str, Any] = {
        "workers": receiver.workers,
        "bots": load.bots,
        "streams": streams,
        "realtime": load.realtime,
        "frames_sent": report.frames,
        "frames_expected": report.expected_frames,
        "messages_sent": report.messages,
        "bytes_sent": report.bytes,
        "send_s": round(sent_s, 3),
        "elapsed_s": round(elapsed, 3),
        "frames_per_s": round(report.frames / elapsed, 1),
        "server_cpu_s": round(cpu, 3),
        "server_cpu_us_per_message": round(cpu / report.messages * 1e6, 1),
        # Cores the receiver's tree kept busy on average, and the whole machine's (the
        # generator and the S3 server included).
        "server_cpu_share": round(cpu / elapsed, 3),
        # (A tiny run may end within /proc's clock tick.)
        "machine_cpu_busy_cores": round(machine_busy / machine_all * (os.cpu_count() or 1), 2)
        if machine_all
        else 0.0,
        "generator_cpu_us_per_message": round(generator_cpu / report.messages * 1e6, 1),
        # How the bots were spread: frames each worker read (floor, naive) or objects it
        # uploaded (archiver).
        "work_counted": field,
        "work_per_worker": [a[field] - b[field] for a, b in zip(after, before, strict=True)],
    }
    if load.realtime:
        result |= {
            "send_lag_p50_ms": report.summary()["send_lag_p50_ms"],
            "send_lag_p99_ms": report.summary()["send_lag_p99_ms"],
            "rss_idle_mib": round(idle.rss_bytes / 2**20, 1),
            "rss_peak_mib": round(peak.rss_bytes / 2**20, 1),
            "processes_at_peak": peak.processes,
            "rss_per_stream_mib": round(
                max(0, peak.rss_bytes - idle.rss_bytes) / streams / 2**20, 2
            ),
            "pss_per_stream_mib": round(
                max(0, peak.pss_bytes - idle.pss_bytes) / streams / 2**20, 2
            ),
        }
    return result, report


def key_class(key: str) -> str:
    parts = key.rsplit("/", 2)
    name, folder = parts[-1], parts[-2] if len(parts) > 1 else ""
    if name.endswith(".jsonl"):
        return "events"
    if name.endswith(".m4s"):
        return "segment"
    if name.startswith("init-"):
        return "init"
    if name == "manifest.json":
        return "events manifest" if folder == "events" else "manifest"
    if name == "playlist.m3u8":
        return "playlist"
    if name == "session.json":
        return "session"
    return "other"


DOCUMENTS = ("manifest", "playlist", "session", "events manifest")
"""The manifests and indexes: what the target of at most 10% of S3 requests is about."""


def s3_requests(log_path: Path, bot_ids: set[str]) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines() if line]
    mine = []
    for line in lines:
        parts = line["path"].lstrip("/").split("/")
        # Path-style: /bucket/prefix/bot/recording/...
        if len(parts) > 2 and parts[2] in bot_ids:
            line["key"] = "/".join(parts[1:])
            mine.append(line)
    return mine


def count_requests(requests: list[dict[str, Any]], stream_hours: float) -> dict[str, Any]:
    """S3 requests and bytes by method and kind of object, per stream-hour, and the share of
    requests (any method) that manifests and indexes take."""
    by_class: Counter[str] = Counter()
    bytes_by_class: Counter[str] = Counter()
    documents = 0
    for request in requests:
        kind = key_class(request["key"])
        by_class[f"{request['method']} {kind}"] += 1
        bytes_by_class[kind] += request["bytes_in"]
        documents += kind in DOCUMENTS
    total = sum(by_class.values())
    return {
        "s3_requests": dict(sorted(by_class.items())),
        "s3_bytes_in": dict(sorted(bytes_by_class.items())),
        "s3_requests_per_stream_hour": {
            name: round(count / stream_hours, 1) for name, count in sorted(by_class.items())
        },
        "s3_requests_per_stream_hour_total": round(total / stream_hours, 1),
        "s3_bytes_per_stream_hour": round(sum(bytes_by_class.values()) / stream_hours),
        "manifest_and_index_share_of_requests": round(documents / total, 4) if total else None,
    }


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def archiver_details(
    endpoint: str, log_path: Path, report: LoadReport, load: Load
) -> dict[str, Any]:
    """Read every stream back, time each segment's upload, count the S3 requests."""
    store = S3Store(BUCKET, PREFIX, endpoint_url=endpoint, attempts=2)
    frames_archived = problems = 0
    latencies: list[float] = []
    final_latencies: list[float] = []
    segment_s: list[float] = []
    requests = s3_requests(log_path, {bot.bot_id for bot in report.bots})
    put_done = {r["key"]: r["t"] for r in requests if r["method"] == "PUT" and r["status"] < 300}
    try:
        for bot in report.bots:
            recording = RecordingId(bot.bot_id, bot.recording_id)
            for number, pid in enumerate(bot.participant_ids):
                key = StreamId(recording, str(pid), "webcam", "h264").manifest_key
                check = await check_stream(store, key, key_prefix=f"{PREFIX}/")
                frames_archived += len(check.frames)
                problems += len(check.problems)
                sent = bot.send_times[number]
                first = 0
                segments = check.manifest.get("segments", [])
                for number_in_stream, segment in enumerate(segments):
                    last = first + segment["frames"] - 1
                    if segment["key"] in put_done and last < len(sent):
                        latency = put_done[segment["key"]] - sent[last]
                        if number_in_stream == len(segments) - 1:
                            final_latencies.append(latency)
                        else:
                            latencies.append(latency)
                            segment_s.append(segment["end"] - segment["start"])
                    first = last + 1
    finally:
        await store.close()
    streams = load.bots * load.participants
    counts = count_requests(requests, streams * load.seconds / 3600)
    full = sorted(segment_s)[len(segment_s) // 2] if segment_s else None
    return {
        "frames_archived": frames_archived,
        "frames_expected": report.expected_frames,
        "every_frame_archived": frames_archived == report.expected_frames and not problems,
        "verify_problems": problems,
        "upload_latency_p50_ms": _ms(percentile(latencies, 0.5)),
        "upload_latency_p99_ms": _ms(percentile(latencies, 0.99)),
        "upload_latency_max_ms": _ms(max(latencies) if latencies else None),
        "segments_timed": len(latencies),
        # A stream's last segment is cut when the stream ends (here: its connection closes).
        "final_segment_latency_p50_ms": _ms(percentile(final_latencies, 0.5)),
        "final_segment_latency_p99_ms": _ms(percentile(final_latencies, 0.99)),
        "segment_median_s": full,
        **counts,
        # Over an hour, a stream's fixed writes (init, final manifest and playlist, its
        # share of session.json) are spread; live manifest writes stay within the 10%
        # budget, so documents <= 10% of the media requests plus the fixed writes.
        "s3_puts_per_stream_hour_projected": round(3600 / full * 1.1 + 4, 1) if full else None,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _shape(options: argparse.Namespace, receiver: Receiver) -> dict[str, Any]:
    return {
        "url": receiver.ws_url,
        "participants": options.participants,
        "seconds": options.seconds,
        "fps": options.fps,
        "size": options.size,
        # Bots close without leave events: a leave holds a stream open for
        # ARCHIVER_LEAVE_GRACE_S more (5 s), which would count as time to archive.
        "participant_events": False,
        "join_interval_s": options.join_interval_s,
    }


async def start_receiver(
    name: str, workers: int, workdir: Path, s3: dict[str, Any], label: str = ""
) -> Receiver:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    python = sys.executable
    label = label or f"{name}-{workers}w"
    if name == "floor":
        args = [python, "-m", "benchmarks.floor", "--port", str(port), "--workers", str(workers)]
        process = Process(label, args, workdir, {})
        receiver = Receiver(
            name, process, base_url, workers, "/stats", "worker", "frames",
            lambda answer: answer["connections"] == 0, counts_frames=True,
        )  # fmt: skip
    elif name == "naive":
        args = [python, "-m", "benchmarks.naive", "--port", str(port)]
        args += ["--folder", str(workdir / label), "--fps", str(s3["fps"])]
        process = Process(label, args, workdir, {})
        receiver = Receiver(
            name, process, base_url, 1, "/stats", None, "frames",
            lambda answer: answer["connections"] == 0 and answer["streams_open"] == 0,
            counts_frames=True,
        )  # fmt: skip
    else:
        env = {
            "ARCHIVER_AUTH_TOKENS": TOKEN,
            "ARCHIVER_STORE": f"s3://{BUCKET}/{PREFIX}",
            "ARCHIVER_S3_ENDPOINT_URL": s3["endpoint"],
            "ARCHIVER_HOST": "127.0.0.1",
            "ARCHIVER_PORT": str(port),
            "ARCHIVER_LOG_FORMAT": "json",
            "ARCHIVER_SPOOL_DIR": str(workdir / f"spool-{label}"),
            "ARCHIVER_WORKERS": str(workers),
            **CREDENTIALS,
        }
        process = Process(label, [python, "-m", "archiver", "serve"], workdir, env)
        # Done: every connection closed, every stream ended (its final manifest written),
        # the spool empty, in every worker.
        receiver = Receiver(
            name, process, base_url, workers, "/readyz", "slot", "uploaded",
            lambda answer: answer["connections"] == 0 and answer["streams"] == 0
            and answer["spool_pending_bytes"] == 0,
            counts_frames=False,
        )  # fmt: skip
    try:
        await wait_http(f"{base_url}/healthz")
    except BaseException:
        process.stop()
        raise
    await asyncio.sleep(1.0)  # Let start-up work settle before the idle sample.
    return receiver


async def run_receiver(
    name: str,
    options: argparse.Namespace,
    clip: Clip,
    workdir: Path,
    s3: dict[str, Any],
    workers: int,
    full: bool,
) -> dict[str, Any]:
    """`full`: the real-time run and the fast one; else the fast one only."""
    receiver = await start_receiver(name, workers, workdir, s3)
    shape = _shape(options, receiver)
    result: dict[str, Any] = {"workers": workers}
    try:
        if full:
            realtime_load = Load(bots=options.realtime_bots, record_send_times=True, **shape)
            result["realtime"], report = await measure(receiver, realtime_load, clip)
            if name == "archiver":
                result["archive"] = await archiver_details(
                    s3["endpoint"], s3["log"], report, realtime_load
                )
        # Bots per worker: the kernel spreads connections over the workers, not frames.
        bots = options.fast_bots * workers
        fast_load = Load(bots=bots, realtime=False, record_send_times=False, **shape)
        fast, report = await measure(receiver, fast_load, clip)
        result["fast"] = fast
        if name == "archiver":
            archive = await archiver_details(s3["endpoint"], s3["log"], report, fast_load)
            fast["every_frame_archived"] = archive["every_frame_archived"]
            fast["frames_archived"] = archive["frames_archived"]
            if options.half_rate:
                result["half_rate"] = await half_rate(
                    receiver, options, clip, s3, fast["frames_per_s"]
                )
        if name == "archiver" and full and options.audio:
            audio = encode_audio_clip(options.seconds, options.audio_chunk_ms / 1000)
            realtime_load = Load(bots=options.realtime_bots, **shape)
            result["audio_realtime"], report = await measure(receiver, realtime_load, audio)
            result["audio_realtime"] |= await audio_details(s3["endpoint"], report)
            fast_load = Load(bots=bots, realtime=False, **shape)
            result["audio_fast"], report = await measure(receiver, fast_load, audio)
            result["audio_fast"] |= await audio_details(s3["endpoint"], report)
        return result
    finally:
        receiver.process.stop()


async def audio_details(endpoint: str, report: LoadReport) -> dict[str, Any]:
    """Every participant's audio manifest read back: complete, every chunk sent listed."""
    store = S3Store(BUCKET, PREFIX, endpoint_url=endpoint, attempts=2)
    listed = stored_bytes = samples = 0
    complete = True
    try:
        for bot in report.bots:
            recording = RecordingId(bot.bot_id, bot.recording_id)
            for participant_id in bot.participant_ids:
                stream = StreamId(recording, str(participant_id), "audio", "flac")
                manifest = orjson.loads(await store.get(stream.manifest_key) or b"{}")
                complete &= manifest.get("status") == "complete"
                segments = manifest.get("segments", [])
                listed += sum(segment["chunks"] for segment in segments)
                stored_bytes += sum(segment["bytes"] for segment in segments)
                samples += manifest.get("samples", 0)
    finally:
        await store.close()
    return {
        "every_chunk_listed": complete and listed == report.frames,
        "chunks_listed": listed,
        "stored_bytes_over_pcm": round(stored_bytes / max(1, 2 * samples), 3),
    }


async def half_rate(
    receiver: Receiver,
    options: argparse.Namespace,
    clip: Clip,
    s3: dict[str, Any],
    max_frames_per_s: float,
) -> dict[str, Any]:
    """Real time at about half the rate the fast run reached: segment-durable latency."""
    bot_frames_per_s = options.participants * options.fps
    bots = max(1, round(max_frames_per_s / 2 / bot_frames_per_s))
    load = Load(bots=bots, record_send_times=True, **_shape(options, receiver))
    measured, report = await measure(receiver, load, clip)
    archive = await archiver_details(s3["endpoint"], s3["log"], report, load)
    target_ms = (SEGMENT_TARGET_S + 2) * 1000
    p99 = archive["upload_latency_p99_ms"]
    return {
        "bots": bots,
        "frames_per_s_offered": bot_frames_per_s * bots,
        "share_of_max_rate": round(bot_frames_per_s * bots / max_frames_per_s, 2),
        "frames_per_s": measured["frames_per_s"],
        "server_cpu_share": measured["server_cpu_share"],
        "machine_cpu_busy_cores": measured["machine_cpu_busy_cores"],
        "send_lag_p99_ms": measured["send_lag_p99_ms"],
        "every_frame_archived": archive["every_frame_archived"],
        "segment_durable_p50_ms": archive["upload_latency_p50_ms"],
        "segment_durable_p99_ms": p99,
        "segment_durable_max_ms": archive["upload_latency_max_ms"],
        "segments_timed": archive["segments_timed"],
        "final_segment_durable_p99_ms": archive["final_segment_latency_p99_ms"],
        "target_p99_ms": target_ms,
        "target_met": None if p99 is None else p99 <= target_ms,
    }


async def run_audio_meeting(
    options: argparse.Namespace, workdir: Path, s3: dict[str, Any], workers: int
) -> dict[str, Any]:
    """One bot of `--meeting-streams` participants' audio for `--meeting-hours`, as fast as
    the archiver reads; every S3 request counted by kind, per participant-hour."""
    clip = encode_audio_clip(60.0, options.audio_chunk_ms / 1000)
    receiver = await start_receiver("archiver", workers, workdir, s3, label="meeting-audio")
    seconds = options.meeting_hours * 3600
    load = Load(
        receiver.ws_url,
        participants=options.meeting_streams,
        seconds=seconds,
        realtime=False,
        participant_events=True,
    )
    try:
        measured, report = await measure(receiver, load, clip)
    finally:
        receiver.process.stop()
    bot = report.bots[0]
    requests = s3_requests(s3["log"], {bot.bot_id})
    counts = count_requests(requests, options.meeting_streams * seconds / 3600)
    return {
        "hours": options.meeting_hours,
        "participants": options.meeting_streams,
        "chunk_ms": options.audio_chunk_ms,
        "chunks_sent": report.frames,
        "elapsed_s": measured["elapsed_s"],
        "server_cpu_us_per_chunk": measured["server_cpu_us_per_message"],
        **(await audio_details(s3["endpoint"], report)),
        **counts,
    }


async def run_meeting(
    options: argparse.Namespace, workdir: Path, s3: dict[str, Any], workers: int
) -> dict[str, Any]:
    """One bot of `--meeting-streams` webcams for `--meeting-hours`, as fast as the archiver
    reads; every S3 request counted by kind. The clip lasts two segment targets and is
    replayed: each replay's key frame falls where the segmenter would force a cut anyway, so
    segments are as long as a WebRTC stream's without key frames: the fewest media requests,
    the largest share for the manifests and indexes."""
    clip = encode_clip(2 * SEGMENT_TARGET_S, options.meeting_fps, options.size)
    receiver = await start_receiver("archiver", workers, workdir, s3, label="meeting")
    seconds = options.meeting_hours * 3600
    load = Load(
        receiver.ws_url,
        participants=options.meeting_streams,
        seconds=seconds,
        fps=options.meeting_fps,
        size=options.size,
        realtime=False,
        participant_events=True,
    )
    try:
        measured, report = await measure(receiver, load, clip)
    finally:
        receiver.process.stop()
    bot = report.bots[0]
    requests = s3_requests(s3["log"], {bot.bot_id})
    counts = count_requests(requests, options.meeting_streams * seconds / 3600)
    store = S3Store(BUCKET, PREFIX, endpoint_url=s3["endpoint"], attempts=2)
    streams = []
    try:
        for participant_id in bot.participant_ids:
            recording = RecordingId(bot.bot_id, bot.recording_id)
            stream = StreamId(recording, str(participant_id), "webcam", "h264")
            streams.append(await _meeting_stream(store, stream, requests))
    finally:
        await store.close()
    frames_per_stream = report.frames // options.meeting_streams
    return {
        "hours": options.meeting_hours,
        "streams": options.meeting_streams,
        "fps": options.meeting_fps,
        "workers": workers,
        "frames_sent": report.frames,
        "elapsed_s": measured["elapsed_s"],
        "every_frame_listed": all(
            s["status"] == "complete" and s["frames"] == frames_per_stream for s in streams
        ),
        "segments_per_stream": [s["segments"] for s in streams],
        "segment_median_s": statistics.median(s["segment_median_s"] for s in streams),
        # A live reader's delay: segments stored but not yet listed by a live manifest
        # write, at most, in segments and in seconds of video.
        "unlisted_segments_max": max(s["unlisted_max"] for s in streams),
        "unlisted_video_max_s": max(s["unlisted_video_max_s"] for s in streams),
        **counts,
    }


async def _meeting_stream(
    store: S3Store, stream: StreamId, requests: list[dict[str, Any]]
) -> dict[str, Any]:
    """A stream's final manifest, and how far its live manifest writes lagged its uploads."""
    body = await store.get(stream.manifest_key)
    manifest = orjson.loads(body or b"{}")
    segments = manifest.get("segments", [])
    unlisted = unlisted_max = 0
    prefix = f"{PREFIX}/{stream.prefix}/"
    for request in sorted(requests, key=lambda r: r["t"]):
        if request["method"] != "PUT" or not request["key"].startswith(prefix):
            continue
        kind = key_class(request["key"])
        if kind == "segment":
            unlisted += 1
        elif kind == "manifest":
            unlisted_max, unlisted = max(unlisted_max, unlisted), 0
    lengths = [segment["end"] - segment["start"] for segment in segments]
    longest = sum(sorted(lengths, reverse=True)[:unlisted_max])
    return {
        "status": manifest.get("status"),
        "frames": sum(segment["frames"] for segment in segments),
        "segments": len(segments),
        "segment_median_s": statistics.median(lengths) if lengths else 0.0,
        "unlisted_max": unlisted_max,
        "unlisted_video_max_s": round(longest, 1),
    }


def scaling(runs: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Per receiver and worker count: the fast run's rate, its CPU, and the cores kept busy."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, results in runs.items():
        first = results[0]["fast"]["frames_per_s"]
        rows[name] = []
        for result in results:
            fast = result["fast"]
            row = {
                "workers": result["workers"],
                "bots": fast["bots"],
                "frames_per_s": fast["frames_per_s"],
                "frames_per_s_per_worker": round(fast["frames_per_s"] / result["workers"], 1),
                "speedup": round(fast["frames_per_s"] / first, 2) if first else None,
                "server_cpu_us_per_message": fast["server_cpu_us_per_message"],
                "messages_per_core_s": round(1e6 / max(fast["server_cpu_us_per_message"], 1e-3)),
                "server_cpu_share": fast["server_cpu_share"],
                "machine_cpu_busy_cores": fast["machine_cpu_busy_cores"],
            }
            row["work_counted"] = fast["work_counted"]
            row["work_per_worker"] = fast["work_per_worker"]
            if "every_frame_archived" in fast:
                row["every_frame_archived"] = fast["every_frame_archived"]
            if "half_rate" in result:
                half = result["half_rate"]
                row["half_rate_bots"] = half["bots"]
                row["half_rate_segment_durable_p50_ms"] = half["segment_durable_p50_ms"]
                row["half_rate_segment_durable_p99_ms"] = half["segment_durable_p99_ms"]
            rows[name].append(row)
    return rows


def capacity(
    results: dict[str, Any],
    meeting: dict[str, Any] | None,
    options: argparse.Namespace,
    audio_meeting: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Bots per vCPU at 60% CPU from CPU per message, and the cost of a bot-hour (with each
    participant's audio too, where it ran)."""
    messages_per_bot_s = 16 * 30.0
    lines: dict[str, Any] = {"prices": PRICES, "bot": "16 webcams x 30 fps = 480 messages/s"}
    for name, result in results.items():
        # A tiny run may use less CPU than /proc's clock tick can show.
        cpu_us = max(result["realtime"]["server_cpu_us_per_message"], 1e-3)
        bots = CPU_TARGET / (cpu_us * 1e-6 * messages_per_bot_s)
        vcpu_hour = PRICES["fargate_vcpu_hour"]
        vcpu_hour += PRICES["fargate_gb_per_vcpu"] * PRICES["fargate_gb_hour"]
        entry = {
            "bots_per_vcpu": round(bots, 2),
            "compute_usd_per_bot_hour": round(vcpu_hour / bots, 5),
        }
        archive = result.get("archive")
        if archive is not None:
            entry["s3_requests_usd_per_bot_hour"] = _s3_usd_per_bot_hour(
                archive["s3_requests_per_stream_hour"]
            )
            projected = archive["s3_puts_per_stream_hour_projected"]
            if projected is not None:
                entry["s3_requests_usd_per_bot_hour_projected"] = round(
                    16 * projected * PRICES["s3_put_per_1000"] / 1000, 5
                )
            if meeting is not None:
                # Measured over the meeting: its recording's session.json and events are
                # shared by fewer streams than a 16-participant bot's, so this errs high.
                entry["s3_requests_usd_per_bot_hour_meeting"] = _s3_usd_per_bot_hour(
                    meeting["s3_requests_per_stream_hour"]
                )
        audio = result.get("audio_realtime")
        if audio is not None:
            chunks_per_bot_s = 16 * 1000 / options.audio_chunk_ms
            audio_cpu_s = max(audio["server_cpu_us_per_message"], 1e-3) * 1e-6 * chunks_per_bot_s
            entry["audio_compute_usd_per_bot_hour"] = round(audio_cpu_s / CPU_TARGET * vcpu_hour, 5)
            if audio_meeting is not None:
                entry["audio_s3_requests_usd_per_bot_hour"] = _s3_usd_per_bot_hour(
                    audio_meeting["s3_requests_per_stream_hour"]
                )
        lines[name] = entry
    return lines


def _s3_usd_per_bot_hour(per_stream_hour: dict[str, float]) -> float:
    puts = sum(v for k, v in per_stream_hour.items() if k.startswith(("PUT", "POST", "LIST")))
    gets = sum(v for k, v in per_stream_hour.items() if k.startswith(("GET", "HEAD")))
    usd: float = 16 * (puts * PRICES["s3_put_per_1000"] + gets * PRICES["s3_get_per_1000"])
    return round(usd / 1000, 5)


def table(
    results: dict[str, Any],
    rows_by_workers: dict[str, list[dict[str, Any]]],
    meeting: dict[str, Any] | None,
    audio_meeting: dict[str, Any] | None = None,
) -> str:
    """The README's tables: receivers side by side, then workers, the half-rate latency and
    the meeting's requests where they ran."""
    rows = [
        ("server CPU per message (us)", "realtime", "server_cpu_us_per_message"),
        ("server CPU share (cores)", "realtime", "server_cpu_share"),
        ("send lag p50 / p99 (ms)", "realtime", ("send_lag_p50_ms", "send_lag_p99_ms")),
        ("RSS per stream (MiB)", "realtime", "rss_per_stream_mib"),
        ("PSS per stream (MiB)", "realtime", "pss_per_stream_mib"),
        ("fast: frames/s handled", "fast", "frames_per_s"),
        ("fast: server CPU per message (us)", "fast", "server_cpu_us_per_message"),
    ]
    names = list(results)
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, run, field in rows:
        cells = []
        for name in names:
            values = results[name][run]
            if isinstance(field, tuple):
                cells.append(" / ".join(str(values[f]) for f in field))
            else:
                cells.append(str(values[field]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    archive = results.get("archiver", {}).get("archive")
    if archive is not None:
        lines.append(
            "| segment durable after its last frame p50 / p99 (ms) | "
            + " | ".join(
                f"{archive['upload_latency_p50_ms']} / {archive['upload_latency_p99_ms']}"
                if name == "archiver"
                else ""
                for name in names
            )
            + " |"
        )
    archiver = results.get("archiver", {})
    if "audio_realtime" in archiver:
        real, fast = archiver["audio_realtime"], archiver["audio_fast"]
        lines += [
            "",
            "| archiver | video message | audio chunk |",
            "|---|---|---|",
            f"| server CPU (us), real time | {archiver['realtime']['server_cpu_us_per_message']} "
            f"| {real['server_cpu_us_per_message']} |",
            f"| server CPU (us), fast | {archiver['fast']['server_cpu_us_per_message']} "
            f"| {fast['server_cpu_us_per_message']} |",
            f"| fast: messages/s handled | {archiver['fast']['frames_per_s']} "
            f"| {fast['frames_per_s']} |",
            f"| every one listed | {archiver['fast'].get('every_frame_archived')} "
            f"| {real['every_chunk_listed'] and fast['every_chunk_listed']} |",
            f"| stored bytes / PCM received | | {real['stored_bytes_over_pcm']} |",
        ]
    lines += [
        "",
        "| fast run | workers | bots | frames/s | per worker | speed-up | CPU per message (us) "
        "| tree CPU (cores) | machine CPU (cores) | work per worker "
        "| half rate: bots, durable p50 / p99 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, scaled in rows_by_workers.items():
        for row in scaled:
            half = (
                f"{row['half_rate_bots']}, {row['half_rate_segment_durable_p50_ms']} / "
                f"{row['half_rate_segment_durable_p99_ms']}"
                if "half_rate_bots" in row
                else ""
            )
            work = " / ".join(map(str, row["work_per_worker"])) + f" {row['work_counted']}"
            lines.append(
                f"| {name} | {row['workers']} | {row['bots']} | {row['frames_per_s']} "
                f"| {row['frames_per_s_per_worker']} | {row['speedup']} "
                f"| {row['server_cpu_us_per_message']} | {row['server_cpu_share']} "
                f"| {row['machine_cpu_busy_cores']} | {work} | {half} |"
            )
    if meeting is not None:
        share = meeting["manifest_and_index_share_of_requests"]
        lines += [
            "",
            f"Meeting: {meeting['hours']} h, {meeting['streams']} streams at "
            f"{meeting['fps']} fps, every frame listed: {meeting['every_frame_listed']}; "
            f"manifests and indexes {share:.1%} of S3 requests; a live reader sees a segment "
            f"listed after at most {meeting['unlisted_segments_max']} more segments "
            f"({meeting['unlisted_video_max_s']} s of video).",
            "",
            "| S3 requests per stream-hour | count |",
            "|---|---|",
        ]
        for name, count in meeting["s3_requests_per_stream_hour"].items():
            lines.append(f"| {name} | {count} |")
        lines.append(f"| total | {meeting['s3_requests_per_stream_hour_total']} |")
    if audio_meeting is not None:
        lines += [
            "",
            f"Audio meeting: {audio_meeting['hours']} h, {audio_meeting['participants']} "
            f"participants in {audio_meeting['chunk_ms']} ms chunks, every chunk listed: "
            f"{audio_meeting['every_chunk_listed']}.",
            "",
            "| S3 requests per participant-hour of audio | count |",
            "|---|---|",
        ]
        for name, count in audio_meeting["s3_requests_per_stream_hour"].items():
            lines.append(f"| {name} | {count} |")
        lines.append(f"| total | {audio_meeting['s3_requests_per_stream_hour_total']} |")
    return "\n".join(lines)


async def main_async(options: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="archiver-benchmark-"))
    # Only the local S3 server is ever spoken to: never the machine's own credentials.
    os.environ.update(CREDENTIALS)
    s3_port = free_port()
    s3_log = workdir / "s3-requests.jsonl"
    s3_process = Process(
        "s3",
        [sys.executable, "-m", "benchmarks.s3", "--port", str(s3_port), "--log", str(s3_log)],
        workdir,
        # Objects over 256 KiB go to files in the working folder, not the server's memory: a
        # long meeting stores gigabytes.
        {"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(256 * 1024), "TMPDIR": str(workdir)},
    )
    endpoint = f"http://127.0.0.1:{s3_port}"
    s3 = {"endpoint": endpoint, "log": s3_log, "fps": options.fps}
    try:
        await wait_http(endpoint)
        boto3.session.Session().client(
            "s3", endpoint_url=endpoint, region_name="us-east-1"
        ).create_bucket(Bucket=BUCKET)
        encode_began = time.monotonic()
        clip = encode_clip(options.seconds, options.fps, options.size)
        machine = procs.machine()
        print(f"machine: {machine}", file=sys.stderr)
        print(
            f"clip: {len(clip.units)} access units encoded in "
            f"{time.monotonic() - encode_began:.1f} s, "
            f"mean {statistics.mean(u[2] for u in clip.units):.0f} bytes",
            file=sys.stderr,
        )
        results: dict[str, Any] = {}
        runs: dict[str, list[dict[str, Any]]] = {}
        for number, workers in enumerate(options.workers):
            for name in options.receivers:
                if number and name == "naive":
                    continue  # One process and its ffmpeg children: no worker count.
                print(f"{name}, {workers} worker(s): running", file=sys.stderr)
                result = await run_receiver(
                    name, options, clip, workdir, s3, workers, full=not number
                )
                print(f"{name}: {orjson.dumps(result).decode()}", file=sys.stderr)
                runs.setdefault(name, []).append(result)
                if not number:
                    results[name] = result
        meeting = audio_meeting = None
        if options.meeting_hours > 0:
            print(f"meeting: {options.meeting_hours} h", file=sys.stderr)
            meeting = await run_meeting(options, workdir, s3, max(options.workers))
            print(f"meeting: {orjson.dumps(meeting).decode()}", file=sys.stderr)
            if options.meeting_audio:
                audio_meeting = await run_audio_meeting(options, workdir, s3, max(options.workers))
                print(f"audio meeting: {orjson.dumps(audio_meeting).decode()}", file=sys.stderr)
        rows_by_workers = scaling(runs)
        return {
            "machine": machine,
            "load": {
                "participants": options.participants,
                "fps": options.fps,
                "size": f"{options.size[0]}x{options.size[1]}",
                "seconds": options.seconds,
                "realtime_bots": options.realtime_bots,
                "fast_bots_per_worker": options.fast_bots,
                "join_interval_s": options.join_interval_s,
                "workers": options.workers,
                "segment_target_s": SEGMENT_TARGET_S,
                "mean_access_unit_bytes": round(statistics.mean(u[2] for u in clip.units)),
            },
            "receivers": results,
            "scaling": rows_by_workers,
            "meeting": meeting,
            "audio_meeting": audio_meeting,
            "ratios": ratios(results),
            "capacity": capacity(results, meeting, options, audio_meeting),
            "table": table(results, rows_by_workers, meeting, audio_meeting),
        }
    finally:
        s3_process.stop()
        if options.keep:
            print(f"logs and outputs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    def get(name: str, run: str, field: str) -> float | None:
        value = results.get(name, {}).get(run, {}).get(field)
        return None if value is None else float(value)

    def divide(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else round(a / b, 2)

    cpu = "server_cpu_us_per_message"
    return {
        "archiver_cpu_per_message_over_floor": divide(
            get("archiver", "realtime", cpu), get("floor", "realtime", cpu)
        ),
        "archiver_rate_over_naive": divide(
            get("archiver", "fast", "frames_per_s"), get("naive", "fast", "frames_per_s")
        ),
        "archiver_rss_per_stream_over_naive": divide(
            get("archiver", "realtime", "rss_per_stream_mib"),
            get("naive", "realtime", "rss_per_stream_mib"),
        ),
        "archiver_pss_per_stream_over_naive": divide(
            get("archiver", "realtime", "pss_per_stream_mib"),
            get("naive", "realtime", "pss_per_stream_mib"),
        ),
    }


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def _receivers(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = set(names) - set(RECEIVERS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown receivers: {', '.join(sorted(unknown))}")
    return names


def _counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",")]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("worker counts are whole numbers from 1")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=16)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--size", type=_size, default=(640, 360), help="WIDTHxHEIGHT")
    parser.add_argument("--seconds", type=float, default=30.0, help="of video per bot")
    parser.add_argument("--realtime-bots", type=int, default=1)
    parser.add_argument("--fast-bots", type=int, default=2, help="per worker")
    parser.add_argument(
        "--receivers",
        type=_receivers,
        default=list(RECEIVERS),
        help="which to run, e.g. archiver ('' for none: the meeting only)",
    )
    parser.add_argument(
        "--workers",
        type=_counts,
        default=[1],
        help="worker counts for the floor and the archiver, e.g. 1,2: the first runs "
        "everything, the others the fast run",
    )
    parser.add_argument(
        "--half-rate",
        action="store_true",
        help="after each archiver fast run, real time at about half its rate: latency",
    )
    parser.add_argument(
        "--meeting-hours",
        type=float,
        default=0.0,
        help="also stream a meeting this long (fast) and count S3 requests by kind",
    )
    parser.add_argument("--meeting-streams", type=int, default=4)
    parser.add_argument(
        "--audio",
        action="store_true",
        help="the archiver's runs again with each participant's audio instead of video",
    )
    parser.add_argument(
        "--meeting-audio",
        action="store_true",
        help="the meeting again with audio: S3 requests per participant-hour",
    )
    parser.add_argument("--audio-chunk-ms", type=float, default=20.0)
    parser.add_argument("--meeting-fps", type=float, default=30.0)
    parser.add_argument(
        "--join-interval-s",
        type=float,
        default=0.5,
        help="bots connect this far apart (0: at once; the kernel spreads connections over "
        "the workers by their addresses, so few bots may still meet on one worker)",
    )
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--keep", action="store_true", help="keep the receivers' logs, spool and outputs"
    )
    options = parser.parse_args(argv)
    result = asyncio.run(main_async(options))
    print(result["table"])
    print(orjson.dumps(result["capacity"], option=orjson.OPT_INDENT_2).decode())
    document = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if options.json is not None:
        options.json.write_text(document + "\n")
    print(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
