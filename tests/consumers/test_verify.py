"""`archiver verify`: an intact recording passes; a deleted segment, a flipped byte and a
hole in the timeline are each found and named, and the exit status says so. With
`--decode`, a stream continued mid-GOP decodes in order, frames never received are a gap
and not damage, and media that its checksums match but does not decode is found."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from archiver.cli import main
from tests.conftest import client
from tests.consumers.conftest import Continue, Simulate, sent_pictures, talk


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

    lost_gap = {
        "start": lost["start"],
        "end": lost["end"],
        "kind": "hole",
        "reason": "",
        "references_missing": False,
        "undecoded": None,
    }
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


def h264_document(out: str) -> dict[str, Any]:
    [recording] = orjson.loads(out)["recordings"]
    [document] = [d for d in recording["documents"] if d["format"] == "h264"]
    return document  # type: ignore[no-any-return]


async def test_verify_decodes_a_stream_continued_mid_gop_on_another_task(
    continued_s3: Continue, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reconnect to a second service: its segments start without a key frame, behind the
    first one's init segment; decoded in order, every listed frame decodes."""
    archived = await continued_s3()
    args = [archived.store_url, *archived.endpoint_args, *archived.ids]
    status, out = await run_verify(capsys, *args, "--json")
    assert status == 0, out
    document = h264_document(out)
    assert (document["frames"], document["decoded_frames"]) == (40, None)

    status, out = await run_verify(capsys, *args, "--decode", "--json")
    assert status == 0, out
    document = h264_document(out)
    assert (document["frames"], document["decoded_frames"]) == (40, 40)
    assert document["gaps"] == []
    assert document["problems"] == []
    status, out = await run_verify(capsys, *args, "--decode")
    assert status == 0
    assert "(complete, 5 objects 0.000-4.000 s, 40 of 40 frames decode)" in out


async def test_frames_never_received_are_a_declared_gap_and_an_undeclared_one_a_hole(
    continued_local: Continue, capsys: pytest.CaptureFixture[str]
) -> None:
    # The bot was away for 3 s: what it sent meanwhile never arrived, and the frames after
    # that refer to pictures in between.
    archived = await continued_local(seconds=6, then=(50, 60))
    args = [archived.store_url, *archived.ids]
    status, out = await run_verify(capsys, *args, "--json")
    assert status == 0, out
    document = h264_document(out)
    gap = {"start": 2.0, "end": 5.0, "kind": "declared", "reason": "not_received"}
    assert document["gaps"] == [{**gap, "references_missing": True, "undecoded": None}]
    assert document["problems"] == []

    # Decoded: until the next key frame they decode with artefacts, and FFmpeg conceals
    # away the first one or few; that shortfall is the gap's, not damage.
    status, out = await run_verify(capsys, *args, "--decode", "--json")
    assert status == 0, out
    document = h264_document(out)
    [reported] = document["gaps"]
    assert document["frames"] == 30
    decodable = len(sent_pictures(archived.units))  # what decoding the frames sent gives
    assert 27 <= decodable < 30
    assert document["decoded_frames"] == decodable
    assert reported["undecoded"] == 30 - decodable
    assert document["problems"] == []
    status, out = await run_verify(capsys, *args, "--decode")
    assert status == 0
    assert "gap 2.000-5.000 s (declared: not_received, frames after it refer to pictures" in out
    assert "up to the next key frame, do" in out

    # The same hole, not declared, is damage: the segment after it cannot decode.
    path = Path(archived.store_url.removeprefix("file://")) / archived.manifest_key
    manifest = orjson.loads(path.read_bytes())
    path.write_bytes(orjson.dumps({**manifest, "gaps": []}))
    status, out = await run_verify(capsys, *args, "--decode", "--json")
    assert status == 1
    document = h264_document(out)
    after = next(s for s in manifest["segments"] if s["start"] == 5.0)
    assert document["gaps"] == [{**gap, "kind": "hole", "reason": "", "references_missing": False,
                                 "undecoded": None}]  # fmt: skip
    kinds = {(p["kind"], p["key"]) for p in document["problems"]}
    assert ("hole", after["key"]) in kinds
    assert all(kind in ("hole", "undecodable") for kind, _ in kinds)


async def test_decoding_finds_damage_that_checksums_cannot(
    continued_local: Continue, capsys: pytest.CaptureFixture[str]
) -> None:
    archived = await continued_local()
    args = [archived.store_url, *archived.ids]
    root = Path(archived.store_url.removeprefix("file://"))
    path = root / archived.manifest_key
    manifest = orjson.loads(path.read_bytes())
    segments = manifest["segments"]
    # The first continuing segment holds the next one's frames, and is listed as it is.
    victim, donor = segments[2], segments[3]
    body = (root / donor["key"]).read_bytes()
    (root / victim["key"]).write_bytes(body)
    victim.update(bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
    path.write_bytes(orjson.dumps(manifest))

    status, out = await run_verify(capsys, *args)
    assert status == 0, out
    status, out = await run_verify(capsys, *args, "--decode", "--json")
    assert status == 1
    document = h264_document(out)
    [problem] = document["problems"]
    assert (problem["kind"], problem["key"]) == ("undecodable", victim["key"])
    assert "lists 10 frames, 0 decode" in problem["detail"]
    assert document["decoded_frames"] == 30

    # A segment gone: what continues it up to the next key frame cannot be decoded.
    gone = segments[1]
    (root / gone["key"]).unlink()
    status, out = await run_verify(capsys, *args, "--decode", "--json")
    assert status == 1
    problems = h264_document(out)["problems"]
    assert [(p["kind"], p["key"]) for p in problems] == [
        ("missing", gone["key"]),
        ("undecodable", None),
    ]
    assert problems[1]["detail"] == (
        f"20 frames up to the next key frame not decoded: they depend on {gone['key']}"
    )

    # A stream whose listing begins with a continuing segment (what it continues is gone).
    listed = segments[2:]
    counters = {**manifest["counters"], "archived": 20, "received": 20}
    path.write_bytes(orjson.dumps({**manifest, "segments": listed, "counters": counters}))
    status, out = await run_verify(capsys, *args, "--decode", "--json")
    assert status == 1
    document = h264_document(out)
    assert ("hole", listed[0]["key"]) in {(p["kind"], p["key"]) for p in document["problems"]}
    assert document["decoded_frames"] == 0
    undecodable = [p for p in document["problems"] if p["kind"] == "undecodable"]
    assert {p["key"] for p in undecodable} == {s["key"] for s in listed}


async def test_verify_decodes_each_participants_audio_and_finds_a_damaged_segment(
    local_archive: Simulate, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    talking = await talk(local_archive, seconds=4.0)
    archived = talking.archived
    args = [archived.store_url, *archived.ids, "--decode", "--json"]

    status, out = await run_verify(capsys, *args)
    assert status == 0, out
    [recording] = orjson.loads(out)["recordings"]
    audio = [d for d in recording["documents"] if d["type"] == "audio"]
    assert [(d["participant_id"], d["format"], d["ok"]) for d in audio] == [
        ("100", "flac", True),
        ("101", "flac", True),
        ("102", "flac", True),
    ]
    assert all(d["decoded_frames"] == d["frames"] > 0 for d in audio)

    # Flip one byte inside participant 102's audio, past its headers.
    root = Path(archived.store_url.removeprefix("file://"))
    manifest_key = f"{archived.stream_prefix(102, 'audio', 'flac')}/manifest.json"
    segment = orjson.loads((root / manifest_key).read_bytes())["segments"][0]
    path = root / segment["key"]
    body = bytearray(path.read_bytes())
    body[len(body) // 2] ^= 0xFF
    path.write_bytes(bytes(body))

    status, out = await run_verify(capsys, *args)
    assert status == 1
    [recording] = orjson.loads(out)["recordings"]
    [damaged] = [d for d in recording["documents"] if not d["ok"]]
    assert damaged["participant_id"] == "102"
    assert damaged["type"] == "audio"
    assert [p["kind"] for p in damaged["problems"]] == ["damaged"]
