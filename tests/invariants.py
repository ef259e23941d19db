"""Checks every end-to-end test makes of a stream manifest's counters.

Every frame a stream was given is accounted for exactly once: `received` = `archived` (the
frames of the objects the manifest lists) + `pending` (held, queued or uploading; 0 once the
stream is complete) + every `dropped_*`; and the `invalid_<reason>` counters add up to
`dropped_invalid`.
"""

from __future__ import annotations

from typing import Any


def listed_frames(manifest: dict[str, Any]) -> int:
    """Frames in the objects a manifest lists: H.264 segments or PNG batches."""
    if "segments" in manifest:
        return sum(segment["frames"] for segment in manifest["segments"])
    return sum(batch["frame_count"] for batch in manifest["batches"])


def dropped(counters: dict[str, int]) -> int:
    return sum(n for name, n in counters.items() if name.startswith("dropped_"))


def assert_counters_add_up(manifest: dict[str, Any]) -> dict[str, int]:
    """Assert the accounting invariant of one stream manifest; return its counters."""
    counters: dict[str, int] = manifest["counters"]
    archived = listed_frames(manifest)
    assert counters["archived"] == archived, (counters, archived)
    if manifest["status"] == "complete":
        assert counters["pending"] == 0, counters
    total = counters["archived"] + counters["pending"] + dropped(counters)
    assert counters["received"] == total, counters
    reasons = sum(n for name, n in counters.items() if name.startswith("invalid_"))
    assert counters.get("dropped_invalid", 0) == reasons, counters
    return counters
