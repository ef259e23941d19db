"""Export a recording to ordinary files: MP4s, WAVs, PNG folders and one JSON Lines file.

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

Each participant's audio becomes `{participant}-audio.wav` (16 kHz, mono, 16-bit) whose
sample 0 is the recording's relative time 0, silence wherever nothing was stored, every
participant's file as long as the longest: any two line up sample for sample. The audio is
also copied (not re-encoded) into that participant's webcam MP4s, for each file's time
range, on the same timeline as the video.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import sys
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import groupby
from pathlib import Path
from typing import Any

import av
from tqdm import tqdm

from archiver.consumers.reader import SAMPLE_RATE, TIMESCALE, Archive, StreamInfo
from archiver.errors import DamagedObjectError
from archiver.layout import RecordingId, Source

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


def _packets_in(
    container: Any, stream: Any, tag: int, start_s: float, end_s: float
) -> Iterator[tuple[float, int, Any]]:
    """A stream's packets whose times fall in [start_s, end_s), each with its time (seconds)
    and `tag`, for interleaving; the demuxer's closing empty packet left out."""
    for packet in container.demux(stream):
        if packet.dts is None or packet.pts is None:
            continue
        at = float(packet.pts * packet.time_base)
        if start_s <= at < end_s:
            yield at, tag, packet


_VIDEO, _AUDIO = 0, 1


def remux(
    source: Path,
    destination: Path,
    audio: Path | None = None,
    audio_range: tuple[float, float] = (0.0, 0.0),
) -> int:
    """Copy the video packets of a fragmented MP4 into a standard MP4, index first, with the
    audio packets of `audio` (a fragmented MP4 too) whose times fall in `audio_range`,
    interleaved in time order; return how many video packets were copied."""
    copied = 0
    with (
        av.open(str(source), "r") as inp,
        av.open(str(destination), "w", format="mp4", options={"movflags": "+faststart"}) as out,
    ):
        template = inp.streams.video[0]
        outputs: dict[int, Any] = {_VIDEO: out.add_stream_from_template(template)}
        sources = [_packets_in(inp, template, _VIDEO, float("-inf"), float("inf"))]
        sound = av.open(str(audio), "r") if audio is not None else None
        try:
            if sound is not None:
                heard = sound.streams.audio[0]
                outputs[_AUDIO] = out.add_stream_from_template(heard)
                sources.append(_packets_in(sound, heard, _AUDIO, *audio_range))
            for _, tag, packet in heapq.merge(*sources, key=lambda item: item[0]):
                packet.stream = outputs[tag]
                out.mux(packet)
                copied += tag == _VIDEO
        finally:
            if sound is not None:
                sound.close()
    return copied


def write_wav(source: Path, destination: Path, length: int) -> int:
    """Decode a participant's joined audio segments into a WAV of `length` samples at
    16 kHz whose sample 0 is the recording's time 0: each decoded frame at the place its
    timestamp gives, silence between. Return the samples of audio written."""
    written = heard = 0
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    with av.open(str(source), "r") as inp, wave.open(str(destination), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        for frame in inp.decode(inp.streams.audio[0]):
            if frame.pts is None or frame.time_base is None:
                continue
            at = round(frame.pts * frame.time_base * SAMPLE_RATE)
            pcm = b"".join(bytes(f.planes[0])[: f.samples * 2] for f in resampler.resample(frame))
            skip = max(0, written - at) * 2
            if at > written:
                out.writeframes(bytes((min(at, length) - written) * 2))
                written = min(at, length)
            pcm = pcm[skip : max(0, length - written) * 2]
            out.writeframes(pcm)
            written += len(pcm) // 2
            heard += len(pcm) // 2
        if written < length:
            out.writeframes(bytes((length - written) * 2))
    return heard


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
        video_type: Source | None = None,
    ) -> ExportResult:
        self.output.mkdir(parents=True, exist_ok=True)
        streams = await self.archive.streams(recording, participant_id, video_type)
        manifests = [await self.archive.manifest(stream) for stream in streams]
        audio = {
            stream.participant_id: (stream, manifest)
            for stream, manifest in zip(streams, manifests, strict=True)
            if stream.is_audio
        }
        if video_type == "webcam":
            # The webcam MP4s carry their participant's audio: it is fetched too.
            for stream in await self.archive.streams(recording, participant_id, "audio"):
                audio[stream.participant_id] = (stream, await self.archive.manifest(stream))
                manifests.append(audio[stream.participant_id][1])
        events = await self.archive.document(recording.events_manifest_key)
        self.bar.total = sum(
            entry["bytes"]
            for document in [*manifests, events or {}]
            for entry in document.get("segments", document.get("batches", []))
        )
        self.bar.refresh()
        try:
            joined = {p: await self._joined_audio(*found) for p, found in audio.items()}
            length = max((_stored_end(manifest) for _, manifest in audio.values()), default=0)
            for stream, manifest in zip(streams, manifests, strict=False):
                if stream.is_audio:
                    await self._wav(stream, joined[stream.participant_id], length)
                elif stream.format == "png":
                    await self._png(stream, manifest)
                elif self.reencode is not None:
                    await self._reencoded(stream, manifest, self.reencode)
                else:
                    sound = joined.get(stream.participant_id) if stream.type == "webcam" else None
                    await self._remuxed(stream, manifest, sound)
            if participant_id is None and video_type is None:
                await self._events_and_session(recording, events)
        finally:
            self.bar.close()
            for path in joined.values():
                if path is not None:
                    path.unlink(missing_ok=True)
        return self.result

    async def _joined_audio(self, stream: StreamInfo, manifest: dict[str, Any]) -> Path | None:
        """A participant's audio segments behind their init segment in one file, fetched
        once for both the WAV and the webcam MP4s; None when none can be read."""
        runs = configuration_runs(manifest.get("segments", []))
        if not runs:
            return None
        init_key = runs[0][0]
        init = await self.archive.store.get(self.archive.relative(init_key))
        if init is None:
            self.result.problems.append(f"{init_key}: missing")
            return None
        joined = self.output / f".{stream.name}.fmp4.part"
        with joined.open("wb") as out:
            out.write(init)
            for _, segments in runs:
                for segment in segments:
                    data = await self.fetch(segment)
                    if data is not None:
                        out.write(data)
        return joined

    async def _wav(self, stream: StreamInfo, joined: Path | None, length: int) -> None:
        destination = self.output / f"{stream.name}.wav"
        if joined is None:
            self.result.problems.append(
                f"{destination.name}: no audio segment readable, not written"
            )
            return
        await asyncio.to_thread(write_wav, joined, destination, length)
        self.result.files.append(destination)

    async def _remuxed(
        self, stream: StreamInfo, manifest: dict[str, Any], audio: Path | None = None
    ) -> None:
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
                span = (segments[0]["start"], segments[-1]["end"])
                await asyncio.to_thread(remux, joined, destination, audio, span)
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


def _stored_end(manifest: dict[str, Any]) -> int:
    """One past the last sample an audio manifest lists."""
    return max((segment["end_sample"] for segment in manifest.get("segments", [])), default=0)


def _write(path: Path, body: bytes) -> None:
    path.write_bytes(body)


async def export_recording(
    archive: Archive,
    recording: RecordingId,
    output: Path,
    participant_id: str | None = None,
    video_type: Source | None = None,
    reencode: Size | None = None,
    progress: bool | None = None,
) -> ExportResult:
    """Export a recording (or some of its streams) under `output`; see the module's doc."""
    exporter = Exporter(archive, output, reencode, progress)
    return await exporter.run(recording, participant_id, video_type)
