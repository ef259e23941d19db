"""Export a recording to ordinary files: MP4s, PNG folders and one JSON Lines file.

H.264 streams are remuxed without re-encoding into standard (not fragmented) MP4 with the
index first (`faststart`), keeping the stream's own timestamps: a frame at 3.25 s on the
recording's timeline plays at 3.25 s. An MP4 holds one configuration, so a stream whose
picture size changed becomes one file per configuration, unless re-encoding to one size is
asked for. Segments that continue the one before them mid-GOP (a stream continued on
another worker or task, `starts_with_keyframe: false`) go into the same file, behind the
same init segment. Each object is checked against its manifest as it is fetched; a missing
or damaged one is left out and reported, the rest is still exported. A configuration whose
first listed segment does not start with a key frame (the segments it continues are not in
the archive) is reported too: its frames up to the next key frame are remuxed as archived
but decode with artefacts, if at all (re-encoding leaves them out).
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import groupby
from pathlib import Path
from typing import Any

import av
from tqdm import tqdm

from archiver.consumers.reader import TIMESCALE, Archive, StreamInfo
from archiver.errors import DamagedObjectError
from archiver.layout import RecordingId, VideoType

Size = tuple[int, int]


@dataclass(slots=True)
class ExportResult:
    files: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def configuration_runs(segments: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The listed segments split where the init segment changes: one MP4's worth each."""
    return [(init_key, list(run)) for init_key, run in groupby(segments, lambda s: s["init_key"])]


def leading_frames_problem(
    name: str, segments: list[dict[str, Any]], outcome: str = "decode with artefacts, if at all"
) -> str | None:
    """What is wrong with a configuration's run of segments that begins without a key frame
    (the segments it continues are not listed), or None when it begins with one; `outcome`
    says what becomes of its frames before the key frame."""
    if not segments or segments[0].get("starts_with_keyframe", True):
        return None
    first = segments[0]
    key = next((s for s in segments if s.get("starts_with_keyframe", True)), None)
    upto = segments if key is None else segments[: segments.index(key)]
    frames = sum(s["frames"] for s in upto)
    until = "its end" if key is None else f"the key frame at {key['start']:.3f} s"
    return (
        f"{name}: {first['key']} at {first['start']:.3f} s does not start with a key frame and "
        f"the segments it continues are not listed: {frames} frames up to {until} {outcome}"
    )


def remux(source: Path, destination: Path) -> int:
    """Copy the video packets of a fragmented MP4 into a standard MP4, index first; return
    how many packets were copied."""
    copied = 0
    with (
        av.open(str(source), "r") as inp,
        av.open(str(destination), "w", format="mp4", options={"movflags": "+faststart"}) as out,
    ):
        template = inp.streams.video[0]
        stream = out.add_stream_from_template(template)
        for packet in inp.demux(template):
            if packet.dts is None:
                continue  # the demuxer's closing empty packet
            packet.stream = stream
            out.mux(packet)
            copied += 1
    return copied


class Exporter:
    """Writes one recording's streams and events under `output`, with a progress bar (over
    the bytes fetched) when `progress` is on."""

    def __init__(
        self,
        archive: Archive,
        output: Path,
        reencode: Size | None = None,
        progress: bool | None = None,
    ) -> None:
        self.archive = archive
        self.output = output
        self.reencode = reencode
        self.result = ExportResult()
        self.bar = tqdm(
            total=0,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="export",
            disable=not sys.stderr.isatty() if progress is None else not progress,
            file=sys.stderr,
        )

    def _advance(self, size: int) -> None:
        self.bar.update(size)

    async def fetch(self, entry: dict[str, Any]) -> bytes | None:
        """A listed object, checked; a missing or damaged one is reported, not raised."""
        try:
            data = await self.archive.fetch_listed(entry)
        except DamagedObjectError as exc:
            self.result.problems.append(str(exc))
            data = None
        self._advance(entry["bytes"])
        return data

    async def run(
        self,
        recording: RecordingId,
        participant_id: str | None = None,
        video_type: VideoType | None = None,
    ) -> ExportResult:
        self.output.mkdir(parents=True, exist_ok=True)
        streams = await self.archive.streams(recording, participant_id, video_type)
        manifests = [await self.archive.manifest(stream) for stream in streams]
        events = await self.archive.document(recording.events_manifest_key)
        self.bar.total = sum(
            entry["bytes"]
            for document in [*manifests, events or {}]
            for entry in document.get("segments", document.get("batches", []))
        )
        self.bar.refresh()
        try:
            for stream, manifest in zip(streams, manifests, strict=True):
                if stream.format == "png":
                    await self._png(stream, manifest)
                elif self.reencode is not None:
                    await self._reencoded(stream, manifest, self.reencode)
                else:
                    await self._remuxed(stream, manifest)
            if participant_id is None and video_type is None:
                await self._events_and_session(recording, events)
        finally:
            self.bar.close()
        return self.result

    async def _remuxed(self, stream: StreamInfo, manifest: dict[str, Any]) -> None:
        runs = configuration_runs(manifest.get("segments", []))
        for number, (init_key, segments) in enumerate(runs, start=1):
            name = stream.name if len(runs) == 1 else f"{stream.name}-{number}"
            destination = self.output / f"{name}.mp4"
            problem = leading_frames_problem(destination.name, segments)
            if problem is not None:
                self.result.problems.append(problem)
            init = await self.archive.store.get(self.archive.relative(init_key))
            if init is None:
                self.result.problems.append(f"{init_key}: missing")
                continue
            # The run goes to disk as fetched: a long stream never sits in memory whole.
            joined = self.output / f".{name}.fmp4.part"
            try:
                with joined.open("wb") as out:
                    out.write(init)
                    for segment in segments:
                        data = await self.fetch(segment)
                        if data is not None:
                            out.write(data)
                await asyncio.to_thread(remux, joined, destination)
            finally:
                joined.unlink(missing_ok=True)
            self.result.files.append(destination)

    async def _reencoded(self, stream: StreamInfo, manifest: dict[str, Any], size: Size) -> None:
        """Every configuration scaled to `size` in one H.264 MP4, with the stream's times."""
        destination = self.output / f"{stream.name}.mp4"
        for _, segments in configuration_runs(manifest.get("segments", [])):
            problem = leading_frames_problem(destination.name, segments, "do not decode: left out")
            if problem is not None:
                self.result.problems.append(problem)
        with av.open(
            str(destination), "w", format="mp4", options={"movflags": "+faststart"}
        ) as out:
            encoder = out.add_stream("libx264")
            encoder.width, encoder.height = size
            encoder.pix_fmt = "yuv420p"
            encoder.time_base = Fraction(1, TIMESCALE)
            encoder.codec_context.time_base = Fraction(1, TIMESCALE)
            encoder.options = {"preset": "veryfast", "crf": "20"}
            last_pts = -1
            total = sum(segment["bytes"] for segment in manifest.get("segments", []))
            try:
                async for frame in self.archive.frames(stream):
                    image = frame.image.reformat(width=size[0], height=size[1], format="yuv420p")
                    image.pts = max(last_pts + 1, round(frame.relative_s * TIMESCALE))
                    image.time_base = Fraction(1, TIMESCALE)
                    last_pts = image.pts
                    out.mux(encoder.encode(image))
            except DamagedObjectError as exc:
                self.result.problems.append(str(exc))
            if last_pts >= 0:
                out.mux(encoder.encode(None))
        self._advance(total)
        if last_pts < 0:
            # The encoder never started, so neither did the file.
            destination.unlink(missing_ok=True)
            self.result.problems.append(f"{destination.name}: no frame decodes, not written")
            return
        self.result.files.append(destination)

    async def _png(self, stream: StreamInfo, manifest: dict[str, Any]) -> None:
        """Each frame byte for byte, named by its time (`{seconds}.{microseconds}.png`)."""
        folder = self.output / f"{stream.name}-png"
        folder.mkdir(exist_ok=True)
        for batch in manifest.get("batches", []):
            data = await self.fetch(batch)
            if data is None:
                continue
            for frame in batch["frames"]:
                png = data[frame["offset"] : frame["offset"] + frame["size"]]
                await asyncio.to_thread(_write, folder / os.path.basename(frame["name"]), png)
        self.result.files.append(folder)

    async def _events_and_session(
        self, recording: RecordingId, events: dict[str, Any] | None
    ) -> None:
        session = await self.archive.store.get(recording.session_key)
        if session is not None:
            await asyncio.to_thread(_write, self.output / "session.json", session)
            self.result.files.append(self.output / "session.json")
        if events is None:
            return
        destination = self.output / "events.jsonl"
        with destination.open("wb") as out:
            for batch in events.get("batches", []):
                data = await self.fetch(batch)
                if data is not None:
                    out.writelines(line + b"\n" for line in data.splitlines() if line)
        self.result.files.append(destination)


def _write(path: Path, body: bytes) -> None:
    path.write_bytes(body)


async def export_recording(
    archive: Archive,
    recording: RecordingId,
    output: Path,
    participant_id: str | None = None,
    video_type: VideoType | None = None,
    reencode: Size | None = None,
    progress: bool | None = None,
) -> ExportResult:
    """Export a recording (or some of its streams) under `output`; see the module's doc."""
    exporter = Exporter(archive, output, reencode, progress)
    return await exporter.run(recording, participant_id, video_type)
