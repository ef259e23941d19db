"""`archiver verify`: an intact recording passes; a deleted segment, a flipped byte and a
hole in the timeline are each found and named, and the exit status says so."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from archiver.cli import main
from tests.conftest import client
from tests.consumers.conftest import Simulate


async def run_verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The command as a user runs it: on its own event loop (a thread, beside the service)."""
    status = await asyncio.to_thread(main, ["verify", *args])
    return status, capsys.readouterr().out


async def test_verify_names_missing_damaged_and_lost_segments(
    s3_archive: Simulate, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two webcams, one key frame each: 0.5 s segments that depend on the one before.
    archived = await s3_archive(participants=2, seconds=4, fps=10)
    await s3_archive(participants=1, seconds=2, format="png", fps=2, first_participant_id=300)
    url, endpoint = archived.store_url, archived.endpoint_args

    status, out = await run_verify(capsys, url, *endpoint, *archived.ids)
    assert status == 0, out
    assert "intact" in out
    status, out = await run_verify(capsys, url, *endpoint, *archived.ids, "--json")
    report = orjson.loads(out)
    assert report["ok"] is True
    [recording] = report["recordings"]
    kinds = [(d["participant_id"], d["format"], d["ok"]) for d in recording["documents"]]
    assert kinds == [
        ("100", "h264", True),
        ("101", "h264", True),
        ("300", "png", True),
        (None, None, True),  # the events
    ]

    s3 = client(archived.endpoint_url)
    bucket = url.removeprefix("s3://").split("/")[0]

    def manifest(participant_id: int) -> tuple[str, dict[str, Any]]:
        key = f"archive/{archived.stream_prefix(participant_id, 'webcam', 'h264')}/manifest.json"
        return key, orjson.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())

    # Participant 100: one segment deleted, another with one byte flipped.
    _, first = manifest(100)
    deleted, flipped = first["segments"][1], first["segments"][3]
    s3.delete_object(Bucket=bucket, Key=deleted["key"])
    body = bytearray(s3.get_object(Bucket=bucket, Key=flipped["key"])["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3.put_object(Bucket=bucket, Key=flipped["key"], Body=bytes(body))
    # Participant 101: a segment gone from the listing as well as from the bucket.
    key, second = manifest(101)
    lost = second["segments"].pop(2)
    s3.delete_object(Bucket=bucket, Key=lost["key"])
    s3.put_object(Bucket=bucket, Key=key, Body=orjson.dumps(second))

    status, out = await run_verify(capsys, url, *endpoint, *archived.ids, "--json")
    assert status == 1
    report = orjson.loads(out)
    assert report["ok"] is False
    documents = {d["participant_id"]: d for d in report["recordings"][0]["documents"]}
    problems = {(p["kind"], p["key"]) for p in documents["100"]["problems"]}
    assert problems == {("missing", deleted["key"]), ("damaged", flipped["key"])}
    assert documents["300"]["ok"] is True

    lost_gap = {"start": lost["start"], "end": lost["end"], "kind": "hole", "reason": ""}
    assert documents["101"]["gaps"] == [lost_gap]
    kinds = sorted(p["kind"] for p in documents["101"]["problems"])
    assert kinds == ["counters", "counters", "hole"]
    assert lost["key"] not in out  # it is no longer listed; the segment after the hole is
    assert second["segments"][2]["key"] in out

    # The text report names the same objects, and the gap's time range.
    status, out = await run_verify(capsys, url, *endpoint, *archived.ids)
    assert status == 1
    assert f"missing {deleted['key']}" in out
    assert f"{flipped['key']}: SHA-256 differs" in out
    assert f"gap {lost['start']:.3f}-{lost['end']:.3f} s (hole)" in out

    # Without ids it walks the whole prefix and finds the same recording.
    status, out = await run_verify(capsys, url, *endpoint, "--json")
    assert status == 1
    assert [r["recording_id"] for r in orjson.loads(out)["recordings"]] == [archived.recording_id]


async def test_verify_of_nothing_is_not_intact(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = await run_verify(capsys, f"file://{tmp_path}", "--bot", "b", "--recording", "r")
    assert status == 1
    assert "nothing archived" in out
    status, out = await run_verify(capsys, f"file://{tmp_path}")
    assert status == 1
    assert "no recordings found" in out
