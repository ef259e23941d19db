"""Worker slots of the spool: how many workers, which slot each claims, and which orphaned
slots a starting worker adopts and recovers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from archiver.host.workers import Slot, available_cpus, try_claim
from archiver.recovery.replay import recover
from archiver.store import LocalFolderStore
from archiver.store.spool import Spool
from tests.store.test_recovery import STREAM, segment_entry, spool_listable, stored_json


@pytest.fixture
def eight_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))


@pytest.mark.usefixtures("eight_cpus")
@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", 8),  # no quota: the CPUs it may be scheduled on
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),  # a part of a CPU still gets a worker
        ("50000 100000\n", 1),
        ("1600000 100000\n", 8),  # a quota above the affinity does not add CPUs
        ("garbage\n", 8),
        (None, 8),  # no cgroup v2 file
    ],
)
def test_available_cpus_follows_the_quota_then_the_affinity(
    tmp_path: Path, cpu_max: str | None, expected: int
) -> None:
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    assert available_cpus(path) == expected


def test_available_cpus_affinity_bounds_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    path = tmp_path / "cpu.max"
    path.write_text("400000 100000\n")
    assert available_cpus(path) == 1


def claimed(spool_dir: Path, workers: int) -> Slot:
    slot = try_claim(spool_dir, workers)
    assert slot is not None
    return slot


def test_each_worker_claims_a_free_slot_and_a_dead_ones_slot_is_free_again(
    tmp_path: Path,
) -> None:
    first, second = claimed(tmp_path, 3), claimed(tmp_path, 3)
    third = claimed(tmp_path, 3)
    assert [first.number, second.number, third.number] == [0, 1, 2]
    assert second.folder == tmp_path / "worker-1"
    assert try_claim(tmp_path, 3) is None  # every slot held by a live worker
    second.release()  # what the kernel does when a worker dies
    replacement = claimed(tmp_path, 3)
    assert replacement.number == 1
    for slot in (first, third, replacement):
        slot.release()


def test_orphaned_slots_are_adopted_once(tmp_path: Path) -> None:
    (tmp_path / "worker-3" / "objects").mkdir(parents=True)
    (tmp_path / "worker-1" / "journal").mkdir(parents=True)
    (tmp_path / "objects").mkdir()  # the layout before slots
    first = claimed(tmp_path, 2)
    second = claimed(tmp_path, 2)
    assert first.adopted == [tmp_path / "worker-3", tmp_path]
    assert second.number == 1
    assert second.adopted == []  # worker-1 is its own slot; the orphans are held
    first.release()
    again = claimed(tmp_path, 2)
    assert again.number == 0
    assert again.adopted == [tmp_path / "worker-3", tmp_path]
    for slot in (second, again):
        slot.release()


async def test_an_adopted_slot_is_recovered_into_the_adopters_manifests(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path / "store")
    orphan = tmp_path / "spool" / "worker-3"
    # A worker of slot 3 uploaded a segment and died before any manifest listed it.
    body = b"segment bytes"
    entry = segment_entry(0, body)
    await spool_listable(Spool(orphan, store, cap_bytes=1024**2), entry, body)
    assert list((orphan / "objects").glob("*.meta"))

    slot = claimed(tmp_path / "spool", 2)
    assert slot.adopted == [orphan]
    spool = Spool(slot.folder, store, cap_bytes=1024**2)
    recovery = await recover(spool, slot.folder, 1.0, slot.adopted)
    assert recovery.uploads is not None
    await recovery.uploads
    manifest = await stored_json(store, STREAM.manifest_key)
    assert [s["key"] for s in manifest["segments"]] == [entry.key]
    assert list((orphan / "objects").iterdir()) == []
    slot.release()
