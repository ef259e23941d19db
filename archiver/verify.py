"""Read a stream back from the store and prove it: checksums, order, and decoding."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

import av
import orjson

from archiver.store import ObjectStore


@dataclass(frozen=True, slots=True)
class DecodedFrame:
    time_s: float
    width: int
    height: int


@dataclass(slots=True)
class StreamCheck:
    """What a stream's manifest promised and what decoding its objects delivered."""

    manifest: dict[str, Any]
    frames: list[DecodedFrame] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def check_stream(store: ObjectStore, manifest_key: str, key_prefix: str = "") -> StreamCheck:
    """Fetch every object the manifest names, verify its SHA-256, decode each run of
    segments behind its init segment. `key_prefix` is the store's own prefix, if any."""
    raw = await store.get(manifest_key)
    if raw is None:
        return StreamCheck({}, problems=[f"no manifest at {manifest_key}"])
    check = StreamCheck(orjson.loads(raw))
    segments = check.manifest["segments"]
    seqs = [s["seq"] for s in segments]
    if seqs != sorted(seqs) or len(set(seqs)) != len(seqs):
        check.problems.append("segments out of order")
    for init_key, run in groupby(segments, key=lambda s: s["init_key"]):
        init = await store.get(init_key.removeprefix(key_prefix))
        if init is None:
            check.problems.append(f"missing init segment {init_key}")
            continue
        body = bytearray(init)
        for segment in run:
            data = await store.get(segment["key"].removeprefix(key_prefix))
            if data is None:
                check.problems.append(f"missing segment {segment['key']}")
                continue
            if hashlib.sha256(data).hexdigest() != segment["sha256"]:
                check.problems.append(f"checksum mismatch in {segment['key']}")
            body += data
        check.frames.extend(decode(bytes(body)))
    frames_listed = sum(s["frames"] for s in segments)
    if frames_listed != len(check.frames):
        check.problems.append(f"manifest lists {frames_listed} frames, {len(check.frames)} decode")
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
