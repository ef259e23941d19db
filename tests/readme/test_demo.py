"""The README's first command: `archiver demo`, as a new user runs it, passes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_the_demo_passes_with_every_stream_ok(tmp_path: Path) -> None:
    """The installed entry point, in an empty folder: exit 0 and every stream `ok`."""
    entry_point = Path(sys.executable).with_name("archiver")
    result = subprocess.run(
        [str(entry_point), "demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    verdicts = re.findall(r"^  (participant \d+ \w+/\w+|events): .*: (\w+)$", result.stdout, re.M)
    assert result.returncode == 0, result.stdout + result.stderr
    # 3 participants x webcam + screenshare in H.264, 2 in PNG, and the events.
    assert len(verdicts) == 3 * 2 + 2 + 1, result.stdout
    assert all(verdict == "ok" for _, verdict in verdicts), result.stdout
    assert "180/180 frames decoded" in result.stdout
    assert (tmp_path / "archive").is_dir()
