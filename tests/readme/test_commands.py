"""The README's commands are the ones people and CI run: `.ci/run` runs the README's test
command exactly, and that command lints and type-checks as well as testing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EVERY_TEST = '.venv/bin/python -m pytest -m "slow or not slow"'
"""Plain `pytest` leaves the slow families out; the README's test command runs them all."""


def readme_commands() -> list[str]:
    """The command lines of the README's first shell block, comments left out."""
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_the_readme_opens_with_the_demo_and_the_test_command() -> None:
    demo, tests = readme_commands()
    assert demo.endswith(".venv/bin/archiver demo")
    assert tests.endswith(f" && {EVERY_TEST}")


def test_ci_runs_the_readme_test_command_exactly() -> None:
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


def test_the_test_command_lints_and_type_checks() -> None:
    steps = readme_commands()[1].split(" && ")
    for step in (".venv/bin/ruff check .", ".venv/bin/ruff format --check .", ".venv/bin/mypy"):
        assert step in steps
    assert steps.index(".venv/bin/mypy") < steps.index(EVERY_TEST)
