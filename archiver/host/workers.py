"""Several worker processes on one spool folder: how many, and which part each owns.

Each worker owns one slot, `spool_dir/worker-<n>/` (n in 0..workers-1), a spool folder of its
own (`objects/`, `journal/`), for as long as it holds an exclusive `flock` on
`spool_dir/worker-<n>.lock`. A worker claims the lowest free slot when it starts. The kernel
releases a dead worker's lock, however it died, so the supervisor's replacement finds exactly
that slot free and recovers what its predecessor left; a live sibling's slot stays locked and
is never written. (A stream that reconnects to this worker while a sibling still holds it
reads one thing there: the configuration its open segment started with, `sibling_slots`.)

Slots that no worker number covers any more (the worker count went down, or a version before
slots left `objects/` and `journal/` at the top of `spool_dir`) are orphans: each worker
that starts locks whichever orphans are free and recovers them along with its own slot,
holding their locks for its lifetime too. A worker that dies while recovering them releases
them for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from archiver.layout import SLOT_NAME, SpoolFolders

log = structlog.get_logger(__name__)

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CLAIM_RETRY_S = 0.2


def available_cpus(cpu_max: Path = CPU_MAX) -> int:
    """The CPUs this container may use: its cgroup v2 quota (`cpu.max`, "quota period",
    rounded up) where one is set, never more than the CPUs it may be scheduled on."""
    cpus = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    return max(1, cpus)


@dataclass(slots=True)
class Slot:
    """The spool folder this worker owns, and the orphaned ones it adopted at start."""

    number: int
    folder: Path
    adopted: list[Path] = field(default_factory=list)
    _locks: list[int] = field(default_factory=list, repr=False)

    def release(self) -> None:
        """Give the locks back (the process's exit does the same)."""
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def try_claim(spool_dir: Path, workers: int) -> Slot | None:
    """Lock the lowest free slot and every free orphan; None when all slots are held."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    spool = SpoolFolders(spool_dir)
    for number in range(workers):
        fd = _try_lock(spool.lock_of(spool.slot(number).root))
        if fd is not None:
            break
    else:
        return None
    slot = Slot(number, spool.slot(number).root, _locks=[fd])
    slot.folder.mkdir(exist_ok=True)
    for folder, lock in _orphans(spool_dir, workers):
        fd = _try_lock(lock)
        if fd is not None:
            slot.adopted.append(folder)
            slot._locks.append(fd)
    return slot


async def claim(spool_dir: Path, workers: int) -> Slot:
    """A slot for this worker; waits while every slot is held (a sibling still exiting)."""
    waited = False
    while (slot := await asyncio.to_thread(try_claim, spool_dir, workers)) is None:
        if not waited:
            log.warning("worker_waiting_for_slot", workers=workers)
            waited = True
        await asyncio.sleep(_CLAIM_RETRY_S)
    log.info(
        "worker_slot_claimed",
        slot=slot.number,
        adopted=[folder.name for folder in slot.adopted],
    )
    return slot


def sibling_slots(own: Path) -> list[Path]:
    """The other slot folders beside this worker's own (none when `own` is not a slot)."""
    if not SLOT_NAME.fullmatch(own.name):
        return []
    return [
        path
        for path in sorted(own.parent.iterdir())
        if path != own and SLOT_NAME.fullmatch(path.name) and path.is_dir()
    ]


def _orphans(spool_dir: Path, workers: int) -> list[tuple[Path, Path]]:
    """(folder, lock) of every slot beyond the worker count, and of the pre-slot layout."""
    spool = SpoolFolders(spool_dir)
    found = []
    for path in sorted(spool_dir.iterdir()):
        match = SLOT_NAME.fullmatch(path.name)
        if match and path.is_dir() and int(match.group(1)) >= workers:
            found.append((path, spool.lock_of(path)))
    if spool.in_use:
        found.append((spool_dir, spool.lock_of(spool_dir)))
    return found
