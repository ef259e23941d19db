"""Read a stream back from the store and prove it: checksums, order, and decoding (H.264)
or every frame where the manifest says it is (PNG); and a recording's events. The tests'
and the demo's deep check; `archiver.consumers.verify` is the consumers' (no decoding)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from itertools import groupby, pairwise
from typing import Any, Generic, TypeVar

import av
import orjson

from archiver.consumers.verify import counter_problems, order_problems
from archiver.documents.manifests import frames_after_missing_references
from archiver.errors import MediaError
from archiver.layout import RecordingId
from archiver.segmenting.png import MICROS, member_name, read_header
from archiver.store import ObjectStore


@dataclass(frozen=True, slots=True)
class DecodedFrame:
    time_s: float
    width: int
    height: int


FrameT = TypeVar("FrameT")


@dataclass(slots=True)
class Check(Generic[FrameT]):
    """What a manifest promised and what its objects delivered, frame by frame."""

    manifest: dict[str, Any]
    frames: list[FrameT] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def fetch_listed(
    store: ObjectStore, entry: dict[str, Any], key_prefix: str, problems: list[str]
) -> bytes | None:
    """Fetch an object a manifest lists and check it against its entry's size and SHA-256;
    what is wrong goes into `problems`."""
    data = await store.get(entry["key"].removeprefix(key_prefix))
    if data is None:
        problems.append(f"missing {entry['key']}")
    elif len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        problems.append(f"size or checksum mismatch in {entry['key']}")
    return data


StreamCheck = Check[DecodedFrame]


async def check_stream(store: ObjectStore, manifest_key: str, key_prefix: str = "") -> StreamCheck:
    """Fetch every object the manifest names, verify its SHA-256, decode each run of
    segments behind its init segment. `key_prefix` is the store's own prefix, if any."""
    raw = await store.get(manifest_key)
    if raw is None:
        return StreamCheck({}, problems=[f"no manifest at {manifest_key}"])
    check = StreamCheck(orjson.loads(raw))
    segments = check.manifest["segments"]
    check.problems += order_problems(segments)
    for init_key, run in groupby(segments, key=lambda s: s["init_key"]):
        init = await store.get(init_key.removeprefix(key_prefix))
        if init is None:
            check.problems.append(f"missing init segment {init_key}")
            continue
        body = bytearray(init)
        for segment in run:
            data = await fetch_listed(store, segment, key_prefix, check.problems)
            if data is not None:
                body += data
        check.frames.extend(decode(bytes(body)))
    frames_listed = sum(s["frames"] for s in segments)
    # Frames after pictures never received decode with artefacts, or are concealed away.
    may_not_decode = frames_after_missing_references(check.manifest)
    if not frames_listed - may_not_decode <= len(check.frames) <= frames_listed:
        check.problems.append(f"manifest lists {frames_listed} frames, {len(check.frames)} decode")
    check.problems += counter_problems(check.manifest, frames_listed)
    return check


def decode(mp4: bytes) -> list[DecodedFrame]:
    """Decode an init segment followed by media segments; times in seconds."""
    with av.open(io.BytesIO(mp4), "r") as container:
        stream = container.streams.video[0]
        time_base = stream.time_base
        assert time_base is not None
        return [
            DecodedFrame(float(frame.pts * time_base), frame.width, frame.height)
            for frame in container.decode(stream)
            if frame.pts is not None
        ]


@dataclass(frozen=True, slots=True)
class ArchivedPng:
    """One PNG read back from its batch."""

    name: str
    relative_s: float
    width: int
    height: int
    data: bytes


PngStreamCheck = Check[ArchivedPng]


async def check_png_stream(
    store: ObjectStore, manifest_key: str, key_prefix: str = ""
) -> PngStreamCheck:
    """Fetch every batch the manifest names, verify its size and SHA-256, open it with
    tarfile, and check each listed frame: its member, offset and size, and its PNG header."""
    raw = await store.get(manifest_key)
    if raw is None:
        return PngStreamCheck({}, problems=[f"no manifest at {manifest_key}"])
    check = PngStreamCheck(orjson.loads(raw))
    batches = check.manifest["batches"]
    check.problems += order_problems(batches)
    for batch in batches:
        data = await fetch_listed(store, batch, key_prefix, check.problems)
        if data is None:
            continue
        check.frames.extend(_check_batch(batch, data, check.problems))
    times = [frame.relative_s for frame in check.frames]
    if any(later <= earlier for earlier, later in pairwise(times)):
        check.problems.append("frames out of time order")
    listed = sum(b["frame_count"] for b in batches)
    if listed != len(check.frames):
        check.problems.append(f"manifest lists {listed} frames, {len(check.frames)} read back")
    check.problems += counter_problems(check.manifest, listed)
    return check


def _check_batch(batch: dict[str, Any], data: bytes, problems: list[str]) -> list[ArchivedPng]:
    frames: list[ArchivedPng] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
    except tarfile.TarError as exc:
        problems.append(f"{batch['key']} is not a tar: {exc}")
        return frames
    listed = batch["frames"]
    if [m.name for m in members] != [f["name"] for f in listed]:
        problems.append(f"{batch['key']}: members differ from the manifest's frames")
        return frames
    for member, frame in zip(members, listed, strict=True):
        where = f"{batch['key']}:{frame['name']}"
        if not member.isfile() or member.offset_data != frame["offset"]:
            problems.append(f"{where}: not a plain file at offset {frame['offset']}")
            continue
        if member.size != frame["size"]:
            problems.append(f"{where}: size {member.size}, manifest says {frame['size']}")
            continue
        body = data[frame["offset"] : frame["offset"] + frame["size"]]
        try:
            header = read_header(body)
        except MediaError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if (header.width, header.height) != (frame["width"], frame["height"]):
            problems.append(f"{where}: {header.width}x{header.height}, manifest says otherwise")
        if member_name(round(frame["relative"] * MICROS)) != frame["name"]:
            problems.append(f"{where}: name does not carry its time {frame['relative']}")
        frames.append(
            ArchivedPng(frame["name"], frame["relative"], header.width, header.height, body)
        )
    return frames


@dataclass(slots=True)
class EventsCheck:
    """A recording's events manifest and the events its batches hold, in order."""

    manifest: dict[str, Any]
    lines: list[bytes] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.lines]


async def check_events(
    store: ObjectStore, recording: RecordingId, key_prefix: str = ""
) -> EventsCheck:
    """Fetch every events batch the manifest names, verify its SHA-256 and count, and parse
    its lines back into the events as received."""
    raw = await store.get(recording.events_manifest_key)
    if raw is None:
        return EventsCheck({}, problems=[f"no manifest at {recording.events_manifest_key}"])
    check = EventsCheck(orjson.loads(raw))
    batches = check.manifest["batches"]
    check.problems += order_problems(batches)
    for batch in batches:
        data = await fetch_listed(store, batch, key_prefix, check.problems)
        if data is None:
            continue
        lines = [line for line in data.splitlines() if line]
        if len(lines) != batch["count"]:
            check.problems.append(f"{batch['key']} holds {len(lines)} events, not {batch['count']}")
        check.lines.extend(lines)
    return check
