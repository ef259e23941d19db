"""The accounting invariant every end-to-end test checks of a stream manifest, through the
same check `archiver verify` makes."""

from __future__ import annotations

from typing import Any

from archiver.consumers.decode_check import counter_problems


def listed_frames(manifest: dict[str, Any]) -> int:
    """Frames in the objects a manifest lists: H.264 segments, PNG batches or the chunks of
    audio segments."""
    if manifest.get("type") == "audio":
        return sum(segment["chunks"] for segment in manifest["segments"])
    if "segments" in manifest:
        return sum(segment["frames"] for segment in manifest["segments"])
    return sum(batch["frame_count"] for batch in manifest["batches"])


def assert_counters_add_up(manifest: dict[str, Any]) -> dict[str, int]:
    """Assert the accounting invariant of one stream manifest; return its counters."""
    counters: dict[str, int] = manifest["counters"]
    assert "received" in counters, counters
    problems = counter_problems(manifest, listed_frames(manifest))
    assert not problems, (problems, counters)
    return counters
