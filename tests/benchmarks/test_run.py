"""The benchmark runs end to end at a tiny size and writes its JSON with every section."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson

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
