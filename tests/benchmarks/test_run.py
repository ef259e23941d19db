"""The benchmark runs end to end at a tiny size and writes its JSON with every section."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson

from benchmarks.run import count_requests, key_class

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    # The naive receiver runs Debian's ffmpeg, which .ci/run installs: missing, it fails here.
    assert shutil.which("ffmpeg"), "ffmpeg is not on the PATH (apt-get install ffmpeg)"
    out = tmp_path / "result.json"
    command = [sys.executable, "benchmarks/run.py", "--participants", "2", "--seconds", "1.5"]
    command += ["--fps", "10", "--size", "160x120", "--fast-bots", "1", "--json", str(out)]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=150, check=False)
    assert finished.returncode == 0, finished.stderr.decode()[-3000:]
    result = orjson.loads(out.read_bytes())
    assert set(result) >= {"machine", "load", "receivers", "ratios", "capacity", "table"}
    assert set(result["receivers"]) == {"floor", "naive", "archiver"}
    for name, receiver in result["receivers"].items():
        for run in ("realtime", "fast"):
            assert receiver[run]["frames_sent"] == receiver[run]["frames_expected"] > 0, name
            assert receiver[run]["server_cpu_us_per_message"] >= 0, name
        assert "rss_per_stream_mib" in receiver["realtime"], name
        assert "bots_per_vcpu" in result["capacity"][name], name
    archive = result["receivers"]["archiver"]["archive"]
    assert archive["every_frame_archived"], archive
    assert result["receivers"]["archiver"]["fast"]["every_frame_archived"]
    assert archive["s3_requests"]["PUT segment"] > 0
    assert archive["manifest_and_index_share_of_requests"] is not None
    assert "s3_requests_usd_per_bot_hour" in result["capacity"]["archiver"]
    assert "| server CPU per message (us) |" in finished.stdout.decode()


def test_workers_half_rate_and_meeting_options(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "benchmarks.run", "--receivers", "floor,archiver"]
    command += ["--participants", "2", "--seconds", "1.5", "--fps", "10", "--size", "160x120"]
    command += ["--fast-bots", "1", "--workers", "1,2", "--half-rate"]
    command += ["--meeting-hours", "0.02", "--meeting-streams", "2", "--meeting-fps", "10"]
    command += ["--audio", "--meeting-audio"]
    command += ["--json", str(out)]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=240, check=False)
    assert finished.returncode == 0, finished.stderr.decode()[-3000:]
    result = orjson.loads(out.read_bytes())
    for name in ("floor", "archiver"):
        rows = result["scaling"][name]
        assert [row["workers"] for row in rows] == [1, 2], name
        assert [row["bots"] for row in rows] == [1, 2], name
        for row in rows:
            assert row["frames_per_s"] > 0, name
            assert row["machine_cpu_busy_cores"] >= 0, name
        assert len(rows[1]["work_per_worker"]) == 2
    assert all(row["every_frame_archived"] for row in result["scaling"]["archiver"])
    half = result["receivers"]["archiver"]["half_rate"]
    assert half["bots"] >= 1
    assert half["every_frame_archived"]
    assert half["target_p99_ms"] == (result["load"]["segment_target_s"] + 2) * 1000
    meeting = result["meeting"]
    assert meeting["every_frame_listed"], meeting
    assert meeting["frames_sent"] == 2 * round(0.02 * 3600 * 10)
    requests = meeting["s3_requests"]
    for kind in ("segment", "init", "manifest", "playlist", "session", "events"):
        assert requests[f"PUT {kind}"] > 0, kind
    assert 0 < meeting["manifest_and_index_share_of_requests"] < 1
    assert "s3_requests_usd_per_bot_hour_meeting" in result["capacity"]["archiver"]
    archiver = result["receivers"]["archiver"]
    assert archiver["audio_realtime"]["every_chunk_listed"]
    assert archiver["audio_fast"]["every_chunk_listed"]
    audio_meeting = result["audio_meeting"]
    assert audio_meeting["every_chunk_listed"], audio_meeting
    assert audio_meeting["s3_requests"]["PUT segment"] > 0
    assert "audio_s3_requests_usd_per_bot_hour" in result["capacity"]["archiver"]
    printed = finished.stdout.decode()
    assert "| fast run | workers |" in printed
    assert "Meeting: 0.02 h" in printed
    assert "| server CPU (us), real time |" in printed
    assert "Audio meeting: 0.02 h" in printed


def test_requests_are_counted_by_kind() -> None:
    keys = [
        "archive/b/r/participants/1/webcam/h264/segments/0000000000000.m4s",
        "archive/b/r/participants/1/webcam/h264/init-0123456789abcdef.mp4",
        "archive/b/r/participants/1/webcam/h264/manifest.json",
        "archive/b/r/participants/1/webcam/h264/playlist.m3u8",
        "archive/b/r/session.json",
        "archive/b/r/events/0000000000000-000000-w.jsonl",
        "archive/b/r/events/manifest.json",
    ]
    kinds = [key_class(key) for key in keys]
    assert kinds == [
        "segment", "init", "manifest", "playlist", "session", "events", "events manifest",
    ]  # fmt: skip
    requests = [{"key": key, "method": "PUT", "bytes_in": 10} for key in keys]
    counts = count_requests(requests, stream_hours=0.5)
    assert counts["s3_requests_per_stream_hour"]["PUT segment"] == 2.0
    assert counts["manifest_and_index_share_of_requests"] == round(4 / 7, 4)
