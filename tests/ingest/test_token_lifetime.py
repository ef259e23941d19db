"""`archiver token create` mints no token that outlives ARCHIVER_TOKEN_MAX_TTL_S, run as an
operator runs it: the installed command, in a process of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archiver.errors import ConfigError
from archiver.ingest.tokens import TokenCheck, create_token

KEY = "k" * 16 + "0123456789abcdef"


def archiver_command() -> str:
    """The console script installed beside this interpreter (the venv's)."""
    beside = Path(sys.executable).parent / "archiver"
    found = str(beside) if beside.exists() else shutil.which("archiver")
    assert found is not None, "install the package: pip install -e ."
    return found


def token_create(ttl: str, **environment: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [archiver_command(), "token", "create", "--ttl", ttl],
        env={**os.environ, "ARCHIVER_TOKEN_KEYS": KEY, **environment},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def expiry_of(token: str) -> int:
    return int(token.split(".")[2])


@pytest.mark.parametrize(
    ("environment", "longest"),
    [({}, 86400), ({"ARCHIVER_TOKEN_MAX_TTL_S": "600"}, 600)],
)
def test_token_create_refuses_a_lifetime_beyond_the_maximum(
    environment: dict[str, str], longest: int
) -> None:
    refused = token_create(str(longest + 1), **environment)
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert "ARCHIVER_TOKEN_MAX_TTL_S" in refused.stderr
    assert f"{longest} s" in refused.stderr
    assert KEY not in refused.stderr

    before = time.time()
    minted = token_create(str(longest), **environment)
    assert minted.returncode == 0, minted.stderr
    (token,) = minted.stdout.split()
    TokenCheck.build([], [KEY]).verify(token)
    assert before + longest <= expiry_of(token) <= time.time() + longest + 1


def test_create_token_takes_a_maximum_lifetime() -> None:
    with pytest.raises(ConfigError, match="longest allowed"):
        create_token(KEY, 3601, max_ttl_s=3600)
    with pytest.raises(ConfigError, match="longest allowed"):
        create_token(KEY, float("inf"), max_ttl_s=3600)
    assert expiry_of(create_token(KEY, 3600, now=1000.0, max_ttl_s=3600)) == 4600
    # No maximum unless one is given: the library's callers choose their own.
    assert expiry_of(create_token(KEY, 10 * 86400, now=1000.0)) == 1000 + 10 * 86400
