"""CPU and memory of a process tree, read from /proc (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """`pid` and every live descendant."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of the tree: each live process's own time, plus what its
    children that already exited used (counted once, in the parent that reaped them)."""
    ticks = 0
    for member in tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # After the command: state is field 3, so utime..cstime (14..17) sit at 11..14.
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / _TICKS_PER_S


@dataclass(frozen=True, slots=True)
class Memory:
    rss_bytes: int
    pss_bytes: int
    """Proportional set size: shared pages (libraries) split between the processes using
    them, so many children of one program are not charged many times for them."""
    processes: int


def memory(pid: int) -> Memory:
    rss = pss = count = 0
    for member in tree(pid):
        try:
            text = Path(f"/proc/{member}/smaps_rollup").read_text()
        except OSError:
            continue
        count += 1
        for line in text.splitlines():
            name, _, rest = line.partition(":")
            if name == "Rss":
                rss += int(rest.split()[0]) * 1024
            elif name == "Pss":
                pss += int(rest.split()[0]) * 1024
    return Memory(rss, pss, count)


def machine() -> dict[str, object]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    total_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            total_kib = int(line.split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(total_kib / 1024**2, 1),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
    }


def machine_cpu_s() -> tuple[float, float]:
    """CPU seconds the whole machine has spent busy, and in all, over every core: busy over
    all of two readings, times the cores, is how many cores were busy between them."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    total = sum(fields[:8])  # user .. steal (guest time is already in user)
    return (total - idle) / _TICKS_PER_S, total / _TICKS_PER_S
