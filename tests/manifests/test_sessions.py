"""session.json stays bounded whatever the events say, and keeps what matters: the first and
the latest joins and leaves, and each participant's details once."""

from __future__ import annotations

from typing import Any

import orjson

from archiver.documents.manifests import dumps
from archiver.documents.sessions import SessionIndex, SessionLimits
from archiver.layout import RecordingId

RECORDING = RecordingId("bot-1", "rec-1")


def stamp(relative: float) -> dict[str, Any]:
    return {"relative": relative, "absolute": f"2026-01-01T00:00:{relative:09.6f}+00:00"}


def test_joins_and_leaves_keep_the_first_and_the_latest_with_a_count_of_the_rest() -> None:
    index = SessionIndex(RECORDING, SessionLimits(presence_entries=5))
    for n in range(100):
        index.record_presence("7", {"id": 7, "name": "Ann"}, n % 2 == 0, stamp(float(n)))
    (entry,) = index.document()["participants"]
    assert [t["relative"] for t in entry["joins"]] == [0.0, 92.0, 94.0, 96.0, 98.0]
    assert [t["relative"] for t in entry["leaves"]] == [1.0, 93.0, 95.0, 97.0, 99.0]
    assert (entry["joins_dropped"], entry["leaves_dropped"]) == (45, 45)
    assert entry["name"] == "Ann"


def test_bulky_details_are_kept_once_without_their_bulk() -> None:
    index = SessionIndex(RECORDING, SessionLimits(details_bytes=1024))
    versions = [{"blob": "a" * 100_000}, {"blob": "b" * 100_000}]
    for n in range(50):
        details = {"id": 7, "name": "Ann", "is_host": False, "extra_data": versions[n % 2]}
        index.record_presence("7", details, True, {"relative": n, "junk": "x" * 10_000})
    (entry,) = index.document()["participants"]
    assert entry["name"] == "Ann"
    assert entry["details_truncated"] is True
    assert "extra_data" not in entry
    assert entry["joins"][0] == {"relative": 0}
    assert len(dumps(index.document())) < 8 * 1024


def test_participants_beyond_the_size_budget_are_counted_not_listed() -> None:
    index = SessionIndex(RECORDING, SessionLimits(details_bytes=4096, max_bytes=64 * 1024))
    for n in range(1000):
        index.record_presence(str(n), {"id": n, "name": "x" * 1000}, True, stamp(1.0))
    document = index.document()
    listed = len(document["participants"])
    assert 10 < listed < 100
    assert document["participant_updates_omitted"] == 1000 - listed
    assert len(dumps(document)) < 80 * 1024


def test_a_resumed_index_keeps_the_stored_first_join_and_carries_the_counts() -> None:
    earlier = SessionIndex(RECORDING, SessionLimits(presence_entries=3))
    for n in range(10):
        earlier.record_presence("7", {"id": 7}, True, stamp(float(n)))
    stored = orjson.loads(dumps(earlier.document()))

    later = SessionIndex(RECORDING, SessionLimits(presence_entries=3))
    later.record_presence("7", {"id": 7}, True, stamp(50.0))
    later.resume(stored)
    (entry,) = later.document()["participants"]
    assert [t["relative"] for t in entry["joins"]] == [0.0, 9.0, 50.0]
    assert entry["joins_dropped"] == 8
