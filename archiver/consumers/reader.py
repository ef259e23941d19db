"""Read an archive: list recordings and streams, and iterate a stream's decoded frames
between two times, fetching only the objects those frames need.

H.264 segments are fetched one at a time and fed to one decoder per configuration, so a
segment that does not start with a key frame (cut mid-GOP, or continuing the stream on
another worker or task, across frames never received too) decodes after the ones before it
back to its key frame (fetched too when the range starts there). PNG frames are read with
one ranged GET per batch covering just the frames asked for, at the offsets the manifest
gives. A participant's audio comes back as samples on the recording's timeline (16 kHz),
silence where nothing was stored, each segment decoded at the place its `tfdt` gives.
"""

from __future__ import annotations

import hashlib
import io
from bisect import bisect_right
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import av
import numpy as np
import orjson

from archiver.errors import DamagedObjectError
from archiver.layout import (
    AUDIO_FORMATS,
    MediaFormat,
    RecordingId,
    Source,
    recording_of,
    stream_of,
)
from archiver.store import ReadableStore, store_from_url

if TYPE_CHECKING:
    from types import TracebackType

    import numpy.typing as npt

TIMESCALE = 90_000
SAMPLE_RATE = 16_000
"""Audio is stored, and read back, at the rate Recall sends it."""


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """One archived stream: a participant's webcam, screenshare or audio in one format."""

    recording: RecordingId
    participant_id: str
    type: Source
    format: MediaFormat
    manifest_key: str
    """Relative to the store's prefix, like every key this module takes."""

    @property
    def folder(self) -> str:
        return self.manifest_key.rpartition("/")[0]

    @property
    def playlist_key(self) -> str | None:
        return f"{self.folder}/playlist.m3u8" if self.format != "png" else None

    @property
    def is_audio(self) -> bool:
        return self.format in AUDIO_FORMATS

    @property
    def name(self) -> str:
        """`{participant}-{type}`: how exports name the stream's files."""
        return f"{self.participant_id}-{self.type}"


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded picture with its times: `relative_s` on the recording's timeline (Recall's
    `timestamp.relative`), `absolute` on the source's wall clock."""

    relative_s: float
    absolute: datetime
    image: av.VideoFrame
    png: bytes | None = None
    """A PNG stream's frame exactly as archived."""

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    def to_ndarray(self, format: str = "rgb24") -> npt.NDArray[np.uint8]:
        """The picture as a numpy array (height x width x 3 for `rgb24`)."""
        array: npt.NDArray[np.uint8] = self.image.to_ndarray(format=format)  # type: ignore[assignment]
        return array


def parse_stream_key(key: str) -> StreamInfo | None:
    """A stream from its manifest's key; None for any other key."""
    stream = stream_of(key)
    if stream is None:
        return None
    return StreamInfo(
        stream.recording, stream.participant_id, stream.source, stream.media_format, key
    )


def check_object(key: str, data: bytes | None, entry: dict[str, Any]) -> bytes:
    """`data` when it is what the manifest entry promised, else raise `DamagedObjectError`."""
    if data is None:
        raise DamagedObjectError(key, "missing")
    if len(data) != entry["bytes"]:
        raise DamagedObjectError(key, f"{len(data)} bytes, the manifest says {entry['bytes']}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DamagedObjectError(key, "SHA-256 differs from the manifest's")
    return data


def needed_segments(
    segments: list[dict[str, Any]], start_s: float | None, end_s: float | None
) -> list[dict[str, Any]]:
    """The segments that hold frames in [start_s, end_s), and before them those the first
    needs to decode: back to one that starts with a key frame in the same configuration."""
    chosen = [
        index
        for index, segment in enumerate(segments)
        if (start_s is None or segment["end"] > start_s)
        and (end_s is None or segment["start"] < end_s)
    ]
    if not chosen:
        return []
    first = chosen[0]
    while (
        first > 0
        and not segments[first].get("starts_with_keyframe", True)
        and segments[first - 1]["init_key"] == segments[first]["init_key"]
    ):
        first -= 1
    return segments[first : chosen[-1] + 1]


def _packets(init: bytes, segment: bytes) -> Iterator[av.Packet]:  # type: ignore[type-arg]
    """A segment's packets, demuxed behind its init segment; times from its `tfdt`. (The
    demuxer's closing empty packet would put the decoder in draining mode: left out.)"""
    with av.open(io.BytesIO(init + segment), "r") as container:
        for packet in container.demux(container.streams.video[0]):
            if packet.size:
                yield packet


def decode_audio(init: bytes, segment: bytes) -> tuple[int, npt.NDArray[np.int16]]:
    """An audio segment's first sample on the recording's timeline and its samples (16 kHz,
    mono, 16-bit), decoded behind its init segment; raise `av.FFmpegError`."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    parts: list[npt.NDArray[Any]] = []
    first: int | None = None
    with av.open(io.BytesIO(init + segment), "r") as container:
        for frame in container.decode(container.streams.audio[0]):
            if first is None and frame.pts is not None and frame.time_base is not None:
                first = round(frame.pts * frame.time_base * SAMPLE_RATE)
            parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    parts.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    samples = np.concatenate(parts).astype(np.int16) if parts else np.zeros(0, np.int16)
    return first or 0, samples


class Archive:
    """An archive in a store: `async with Archive.open("s3://bucket/prefix") as archive`."""

    def __init__(self, store: ReadableStore) -> None:
        self.store = store
        self.key_prefix = store.location("")

    @classmethod
    def open(cls, url: str, endpoint_url: str | None = None) -> Archive:
        """The archive at `s3://bucket/prefix` (`endpoint_url` for MinIO and the like) or
        `file:///path`."""
        return cls(store_from_url(url, endpoint_url))

    async def __aenter__(self) -> Archive:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.store.close()

    def relative(self, key: str) -> str:
        """A key as a manifest names it (with the bucket prefix) made relative to the store."""
        return key.removeprefix(self.key_prefix)

    async def document(self, key: str) -> dict[str, Any] | None:
        """A JSON document, or None when there is none."""
        raw = await self.store.get(key)
        if raw is None:
            return None
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise DamagedObjectError(key, f"not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise DamagedObjectError(key, "not a JSON object")
        return document

    async def recordings(self, bot_id: str | None = None) -> list[RecordingId]:
        """Every recording in the store (of one bot), by bot and recording id."""
        keys = await self.store.list_keys(f"{bot_id}/" if bot_id else "")
        found = {recording for key in keys if (recording := recording_of(key)) is not None}
        return sorted(found, key=lambda r: (r.bot_id, r.recording_id))

    async def session(self, recording: RecordingId) -> dict[str, Any] | None:
        """The recording's `session.json`: participants, streams, events."""
        return await self.document(recording.session_key)

    async def streams(
        self,
        recording: RecordingId,
        participant_id: str | None = None,
        video_type: Source | None = None,
    ) -> list[StreamInfo]:
        """The recording's streams, found by their manifests in the store."""
        keys = await self.store.list_keys(f"{recording.prefix}/participants/")
        streams = [info for key in keys if (info := parse_stream_key(key)) is not None]
        return [
            info
            for info in streams
            if (participant_id is None or info.participant_id == participant_id)
            and (video_type is None or info.type == video_type)
        ]

    async def manifest(self, stream: StreamInfo) -> dict[str, Any]:
        document = await self.document(stream.manifest_key)
        if document is None:
            raise DamagedObjectError(stream.manifest_key, "missing")
        return document

    async def fetch_listed(self, entry: dict[str, Any]) -> bytes:
        """A listed object, checked against its manifest entry."""
        key = self.relative(entry["key"])
        return check_object(entry["key"], await self.store.get(key), entry)

    async def frames(
        self,
        stream: StreamInfo,
        start_s: float | None = None,
        end_s: float | None = None,
    ) -> AsyncIterator[Frame]:
        """The stream's frames with `start_s <= relative_s < end_s`, decoded, in order."""
        manifest = await self.manifest(stream)
        if stream.format == "png":
            async for frame in self._png_frames(manifest, start_s, end_s):
                yield frame
            return
        async for frame in self._h264_frames(manifest, start_s, end_s):
            yield frame

    async def _h264_frames(
        self, manifest: dict[str, Any], start_s: float | None, end_s: float | None
    ) -> AsyncIterator[Frame]:
        segments = needed_segments(manifest.get("segments", []), start_s, end_s)
        starts = [segment["start"] for segment in segments]
        decoder: av.VideoCodecContext | None = None
        init_key, init = "", b""
        for segment in segments:
            if segment["init_key"] != init_key:
                if decoder is not None:
                    for image in decoder.decode(None):
                        frame = self._timed(image, segments, starts, start_s, end_s)
                        if frame is not None:
                            yield frame
                init_key = segment["init_key"]
                raw = await self.store.get(self.relative(init_key))
                if raw is None:
                    raise DamagedObjectError(init_key, "missing")
                init, decoder = raw, None
            data = await self.fetch_listed(segment)
            for packet in _packets(init, data):
                if decoder is None:
                    codec = packet.stream.codec_context
                    decoder = av.CodecContext.create(codec.name, "r")
                    assert isinstance(decoder, av.VideoCodecContext)
                    decoder.extradata = codec.extradata
                for image in decoder.decode(packet):
                    frame = self._timed(image, segments, starts, start_s, end_s)
                    if frame is not None:
                        yield frame
        if decoder is not None:
            for image in decoder.decode(None):
                frame = self._timed(image, segments, starts, start_s, end_s)
                if frame is not None:
                    yield frame

    @staticmethod
    def _timed(
        image: av.VideoFrame,
        segments: list[dict[str, Any]],
        starts: list[float],
        start_s: float | None,
        end_s: float | None,
    ) -> Frame | None:
        if image.pts is None or image.time_base is None:
            return None
        relative = round(float(image.pts * image.time_base), 6)
        if (start_s is not None and relative < start_s) or (
            end_s is not None and relative >= end_s
        ):
            return None
        segment = segments[max(0, bisect_right(starts, relative) - 1)]
        wallclock = datetime.fromisoformat(segment["start_wallclock"])
        absolute = wallclock + timedelta(seconds=relative - segment["start"])
        return Frame(relative, absolute, image)

    async def _png_frames(
        self, manifest: dict[str, Any], start_s: float | None, end_s: float | None
    ) -> AsyncIterator[Frame]:
        for batch in manifest.get("batches", []):
            frames = [
                frame
                for frame in batch["frames"]
                if (start_s is None or frame["relative"] >= start_s)
                and (end_s is None or frame["relative"] < end_s)
            ]
            if not frames:
                continue
            first = frames[0]["offset"]
            last = frames[-1]["offset"] + frames[-1]["size"]
            data = await self.store.get_range(self.relative(batch["key"]), first, last - first)
            if data is None or len(data) != last - first:
                raise DamagedObjectError(batch["key"], "missing or shorter than its frames")
            for frame in frames:
                png = data[frame["offset"] - first : frame["offset"] - first + frame["size"]]
                decoder = av.CodecContext.create("png", "r")
                images = decoder.decode(av.Packet(png))
                if len(images) != 1 or not isinstance(images[0], av.VideoFrame):
                    raise DamagedObjectError(batch["key"], f"{frame['name']} does not decode")
                absolute = datetime.fromisoformat(frame["absolute"])
                yield Frame(frame["relative"], absolute, images[0], png)

    async def audio_blocks(
        self, stream: StreamInfo, start_s: float = 0.0, end_s: float | None = None
    ) -> AsyncIterator[tuple[int, npt.NDArray[np.int16]]]:
        """The stored audio that falls in [start_s, end_s), segment by segment: each block's
        first sample on the timeline and its samples, in order, fetching only the segments
        the range needs."""
        manifest = await self.manifest(stream)
        first = round(start_s * SAMPLE_RATE)
        last = None if end_s is None else round(end_s * SAMPLE_RATE)
        inits: dict[str, bytes] = {}
        for segment in manifest.get("segments", []):
            if segment["end_sample"] <= first or (
                last is not None and segment["start_sample"] >= last
            ):
                continue
            init_key = segment["init_key"]
            if init_key not in inits:
                raw = await self.store.get(self.relative(init_key))
                if raw is None:
                    raise DamagedObjectError(init_key, "missing")
                inits[init_key] = raw
            try:
                at, samples = decode_audio(inits[init_key], await self.fetch_listed(segment))
            except av.FFmpegError as exc:
                raise DamagedObjectError(segment["key"], f"does not decode: {exc}") from None
            begin = max(first, at)
            end = at + len(samples) if last is None else min(last, at + len(samples))
            if end > begin:
                yield begin, samples[begin - at : end - at]

    async def audio(
        self, stream: StreamInfo, start_s: float = 0.0, end_s: float | None = None
    ) -> npt.NDArray[np.int16]:
        """A participant's audio for [start_s, end_s) as one array at 16 kHz, sample 0 at
        `start_s`, silence where nothing was stored; to the end of what is stored when
        `end_s` is None."""
        first = round(start_s * SAMPLE_RATE)
        blocks = [block async for block in self.audio_blocks(stream, start_s, end_s)]
        if end_s is not None:
            length = max(0, round(end_s * SAMPLE_RATE) - first)
        else:
            length = max((at + len(samples) - first for at, samples in blocks), default=0)
        line = np.zeros(length, dtype=np.int16)
        for at, samples in blocks:
            line[at - first : at - first + len(samples)] = samples
        return line

    async def events(self, recording: RecordingId) -> AsyncIterator[bytes]:
        """The recording's events as received, one JSON line each, in order."""
        manifest = await self.document(recording.events_manifest_key)
        for batch in [] if manifest is None else manifest.get("batches", []):
            for line in (await self.fetch_listed(batch)).splitlines():
                if line:
                    yield line
