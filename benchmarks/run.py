"""The archiver beside a floor and a naive receiver, on this machine, in one run.

    python -m benchmarks.run [--seconds 30 --realtime-bots 1 --fast-bots 2 --json out.json]

Each receiver runs as its own process tree on a loopback port, one worker process each, and
gets the same load from `archiver.loadgen` (run in this process): bots of `--participants`
webcams at `--fps`, replaying one clip encoded before the clock starts.

- real time: `--realtime-bots` bots for `--seconds`. Server CPU per message (utime + stime
  of the receiver's whole process tree, ffmpeg children included, from /proc, from the first
  send until the receiver has handled every frame), and memory per stream (the tree's
  peak RSS and PSS under load minus its RSS and PSS idle before, over the streams).
  For the archiver also: upload latency, S3 requests, and every frame read back.
- fast: `--fast-bots` bots sending as fast as the receiver reads (TCP backpressure). The
  rate is frames over the time from the first send until the receiver has handled the last
  (archiver: every stream's final manifest stored and the spool empty).

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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import boto3
import orjson

from archiver.layout import RecordingId, StreamId
from archiver.loadgen import Clip, Load, LoadReport, encode_clip, run_load
from archiver.store import S3Store
from archiver.verify import check_stream
from benchmarks import procs

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "benchmark-token"  # noqa: S105 (a local benchmark's)
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "benchmark",
    "AWS_SECRET_ACCESS_KEY": "benchmark",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "benchmark"
PREFIX = "archive"
RECEIVERS = ("floor", "naive", "archiver")
CPU_TARGET = 0.6
# AWS list prices, us-east-1, as published in November 2026 (not fetched by this script).
PRICES = {
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


Done = Callable[[LoadReport], Awaitable[None]]


async def measure(
    pid: int, load: Load, clip: Clip, done: Done
) -> tuple[dict[str, Any], LoadReport]:
    """Send `load`, wait until the receiver has handled it, and measure the receiver."""
    idle = procs.memory(pid)
    sampler = MemorySampler(pid)
    cpu_before = procs.cpu_s(pid)
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    sampler.start()
    began = time.monotonic()
    report = await run_load(load, clip)
    sent_s = time.monotonic() - began
    await done(report)
    elapsed = time.monotonic() - began
    cpu = procs.cpu_s(pid) - cpu_before
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    peak = sampler.stop()
    streams = load.bots * load.participants
    generator_cpu = (self_after.ru_utime + self_after.ru_stime) - (
        self_before.ru_utime + self_before.ru_stime
    )
    result: dict[str, Any] = {
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
        "server_cpu_share": round(cpu / elapsed, 3),
        "generator_cpu_us_per_message": round(generator_cpu / report.messages * 1e6, 1),
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


async def poll(check: Callable[[], Awaitable[bool]], timeout_s: float = 300.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 (another process's counters)
            await asyncio.sleep(0.05)


def counts_done(url: str, streams_key: str | None) -> Done:
    """floor and naive: every frame counted, every connection (and ffmpeg) finished."""

    async def done(report: LoadReport) -> None:
        async def check() -> bool:
            stats = await get_json(url)
            finished = stats["connections"] == 0 and stats["frames"] >= report.frames
            return finished and (streams_key is None or stats[streams_key] == 0)

        await poll(check)

    return done


def archiver_done(url: str) -> Done:
    """Every connection closed, every stream ended (final manifest written), spool empty."""

    async def done(report: LoadReport) -> None:
        async def check() -> bool:
            ready = await get_json(url)
            return (
                ready["connections"] == 0
                and ready["streams"] == 0
                and ready["spool_pending_bytes"] == 0
            )

        await poll(check)

    return done


def key_class(key: str) -> str:
    name = key.rsplit("/", 1)[-1]
    if name.endswith(".jsonl"):
        return "events"
    if name.endswith(".m4s"):
        return "segment"
    if name.startswith("init-"):
        return "init"
    if name == "manifest.json":
        return "manifest"
    if name in ("playlist.m3u8", "session.json"):
        return "index"
    return "other"


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
    stream_hours = streams * load.seconds / 3600
    by_class: Counter[str] = Counter()
    bytes_by_class: Counter[str] = Counter()
    for request in requests:
        kind = key_class(request["key"])
        by_class[f"{request['method']} {kind}"] += 1
        bytes_by_class[kind] += request["bytes_in"]
    puts = {k.split()[1]: v for k, v in by_class.items() if k.startswith("PUT ")}
    all_requests = sum(by_class.values())
    documents = puts.get("manifest", 0) + puts.get("index", 0)
    per_hour = {name: round(count / stream_hours, 1) for name, count in sorted(by_class.items())}
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
        "s3_requests": dict(sorted(by_class.items())),
        "s3_bytes_in": dict(sorted(bytes_by_class.items())),
        "s3_requests_per_stream_hour": per_hour,
        "s3_requests_per_stream_hour_total": round(all_requests / stream_hours, 1),
        "s3_bytes_per_stream_hour": round(sum(bytes_by_class.values()) / stream_hours),
        "manifest_and_index_share_of_requests": round(documents / all_requests, 3)
        if all_requests
        else None,
        # Over an hour, a stream's fixed writes (init, final manifest and playlist, its
        # share of session.json) are spread; live manifest writes stay within the 10%
        # budget, so documents <= 10% of the media requests plus the fixed writes.
        "s3_puts_per_stream_hour_projected": round(3600 / full * 1.1 + 4, 1) if full else None,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def run_receiver(
    name: str, options: argparse.Namespace, clip: Clip, workdir: Path, s3: dict[str, Any]
) -> dict[str, Any]:
    port = free_port()
    python = sys.executable
    if name == "floor":
        process = Process(
            name, [python, "-m", "benchmarks.floor", "--port", str(port)], workdir, {}
        )
        url, done = f"http://127.0.0.1:{port}", counts_done(f"http://127.0.0.1:{port}/stats", None)
    elif name == "naive":
        args = [python, "-m", "benchmarks.naive", "--port", str(port)]
        args += ["--folder", str(workdir / "naive"), "--fps", str(options.fps)]
        process = Process(name, args, workdir, {})
        url = f"http://127.0.0.1:{port}"
        done = counts_done(f"{url}/stats", "streams_open")
    else:
        env = {
            "ARCHIVER_AUTH_TOKENS": TOKEN,
            "ARCHIVER_STORE": f"s3://{BUCKET}/{PREFIX}",
            "ARCHIVER_S3_ENDPOINT_URL": s3["endpoint"],
            "ARCHIVER_HOST": "127.0.0.1",
            "ARCHIVER_PORT": str(port),
            "ARCHIVER_LOG_FORMAT": "json",
            "ARCHIVER_SPOOL_DIR": str(workdir / "spool"),
            # One worker, like the floor and each naive receiver's server: per-message
            # figures side by side. (/readyz, which tells when all is archived, is per worker.)
            "ARCHIVER_WORKERS": "1",
            **CREDENTIALS,
        }
        process = Process(name, [python, "-m", "archiver", "serve"], workdir, env)
        url, done = f"http://127.0.0.1:{port}", archiver_done(f"http://127.0.0.1:{port}/readyz")
    ws_url = f"ws://127.0.0.1:{port}/ws?token={TOKEN}"
    try:
        await wait_http(f"{url}/healthz")
        await asyncio.sleep(1.0)  # Let start-up work settle before the idle sample.
        shape = {
            "url": ws_url,
            "participants": options.participants,
            "seconds": options.seconds,
            "fps": options.fps,
            "size": options.size,
            # Bots close without leave events: a leave holds a stream open for
            # ARCHIVER_LEAVE_GRACE_S more (5 s), which would count as time to archive.
            "participant_events": False,
        }
        realtime_load = Load(bots=options.realtime_bots, record_send_times=True, **shape)
        realtime, report = await measure(process.pid, realtime_load, clip, done)
        result: dict[str, Any] = {"realtime": realtime}
        if name == "archiver":
            result["archive"] = await archiver_details(
                s3["endpoint"], s3["log"], report, realtime_load
            )
        fast_load = Load(bots=options.fast_bots, realtime=False, record_send_times=False, **shape)
        fast, report = await measure(process.pid, fast_load, clip, done)
        result["fast"] = fast
        if name == "archiver":
            archive = await archiver_details(s3["endpoint"], s3["log"], report, fast_load)
            fast["every_frame_archived"] = archive["every_frame_archived"]
            fast["frames_archived"] = archive["frames_archived"]
        return result
    finally:
        process.stop()


def capacity(results: dict[str, Any], options: argparse.Namespace) -> dict[str, Any]:
    """Bots per vCPU at 60% CPU from CPU per message, and the cost of a bot-hour."""
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
            per_hour = archive["s3_requests_per_stream_hour"]
            puts = sum(v for k, v in per_hour.items() if k.startswith(("PUT", "POST", "LIST")))
            gets = sum(v for k, v in per_hour.items() if k.startswith(("GET", "HEAD")))
            s3_usd = 16 * (puts * PRICES["s3_put_per_1000"] + gets * PRICES["s3_get_per_1000"])
            entry["s3_requests_usd_per_bot_hour"] = round(s3_usd / 1000, 5)
            projected = archive["s3_puts_per_stream_hour_projected"]
            if projected is not None:
                entry["s3_requests_usd_per_bot_hour_projected"] = round(
                    16 * projected * PRICES["s3_put_per_1000"] / 1000, 5
                )
        lines[name] = entry
    return lines


def table(results: dict[str, Any]) -> str:
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
        {},
    )
    endpoint = f"http://127.0.0.1:{s3_port}"
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
        for name in options.receivers:
            print(f"{name}: running", file=sys.stderr)
            results[name] = await run_receiver(
                name, options, clip, workdir, {"endpoint": endpoint, "log": s3_log}
            )
            print(f"{name}: {orjson.dumps(results[name]).decode()}", file=sys.stderr)
        return {
            "machine": machine,
            "load": {
                "participants": options.participants,
                "fps": options.fps,
                "size": f"{options.size[0]}x{options.size[1]}",
                "seconds": options.seconds,
                "realtime_bots": options.realtime_bots,
                "fast_bots": options.fast_bots,
                "mean_access_unit_bytes": round(statistics.mean(u[2] for u in clip.units)),
            },
            "receivers": results,
            "ratios": ratios(results),
            "capacity": capacity(results, options),
            "table": table(results),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=16)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--size", type=_size, default=(640, 360), help="WIDTHxHEIGHT")
    parser.add_argument("--seconds", type=float, default=30.0, help="of video per bot")
    parser.add_argument("--realtime-bots", type=int, default=1)
    parser.add_argument("--fast-bots", type=int, default=2)
    parser.add_argument("--receivers", type=lambda text: text.split(","), default=list(RECEIVERS))
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
