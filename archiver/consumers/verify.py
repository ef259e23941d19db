"""Check a recording in the store against its manifests; with `decode`, decode its H.264
and audio.

For every stream manifest and the events manifest: every listed object (and init segment)
is present with the size and SHA-256 its manifest gives; the objects are listed in order;
segments neither overlap nor leave a hole a later segment depends on; the counters add up.
Gaps in a stream's timeline are reported with their time ranges: those the manifest
declares in its `gaps` (the archiver's own failures, and frames it never received while the
bot was disconnected), pauses (the next segment starts with a key frame, so nothing after
them is lost), and holes (the next segment needs what is missing, so it cannot decode),
which alone make the stream damaged. A segment that does not start with a key frame right
after a declared `not_received` gap is no hole: nothing the archiver received is missing.

Objects are fetched a few at a time, in listed order, and let go once checked. With
`decode`, each H.264 stream is decoded too, one run at a time: a segment that starts with a
key frame (or a new init segment) and the segments after it that continue it (same init
segment), fed in order to one decoder. Every listed frame must decode; a segment whose
frames do not is damaged, except after a declared `not_received` gap whose frames after it
refer to pictures inside it (`references_missing`): until the next key frame those decode
with artefacts, and FFmpeg may conceal some away, a shortfall the gap reports (`undecoded`).
Every audio segment stands alone: with `decode`, each one must decode to the samples its
entry lists, starting at the sample its entry names.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from bisect import bisect_right
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

import av

from archiver.consumers.reader import Archive, StreamInfo, decode_audio, parse_stream_key
from archiver.documents.playlists import CONTINUITY_TOLERANCE_S
from archiver.errors import DamagedObjectError
from archiver.layout import RecordingId, init_name, object_name, recording_of

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONCURRENT_FETCHES = 8
OPUS_FRAME_SAMPLES = 320
"""A lossy codec's samples may differ from the listed count by up to a frame (its padding)."""
NOT_RECEIVED = "not_received"
"""The reason of a declared gap of frames the archiver never got (the bot was away)."""


def order_problems(entries: list[dict[str, Any]]) -> list[str]:
    """A manifest lists its objects with strictly increasing `seq`."""
    seqs = [entry["seq"] for entry in entries]
    if seqs != sorted(seqs) or len(set(seqs)) != len(seqs):
        return ["listed out of order"]
    return []


def counter_problems(manifest: dict[str, Any], listed_frames: int) -> list[str]:
    """Every frame a stream was given is accounted for once: `received` = `archived` (the
    frames of the listed objects) + `pending` (0 once complete) + every `dropped_*`, and the
    `invalid_<reason>` counters add up to `dropped_invalid`. Manifests without `received`
    (written before these counters existed) are not checked."""
    counters = manifest.get("counters", {})
    if "received" not in counters:
        return []
    problems = []
    if counters.get("archived") != listed_frames:
        problems.append(f"counters say {counters.get('archived')} archived, {listed_frames} listed")
    pending = counters.get("pending", 0)
    if manifest.get("status") == "complete" and pending:
        problems.append(f"complete with {pending} frames pending")
    dropped = sum(n for name, n in counters.items() if name.startswith("dropped_"))
    if counters["received"] != listed_frames + pending + dropped:
        problems.append(
            f"{counters['received']} received but {listed_frames} archived + {pending} "
            f"pending + {dropped} dropped"
        )
    reasons = sum(n for name, n in counters.items() if name.startswith("invalid_"))
    if counters.get("dropped_invalid", 0) != reasons:
        problems.append(
            f"dropped_invalid is {counters.get('dropped_invalid', 0)}, reasons {reasons}"
        )
    return problems


@dataclass(frozen=True, slots=True)
class Problem:
    """Something that makes a recording other than intact. `key` names the object (as it
    is in the bucket) when one is missing or damaged."""

    kind: str
    """`missing`, `damaged`, `order`, `overlap`, `hole`, `counters`, `document`, or (when
    decoding) `undecodable`."""
    detail: str
    key: str | None = None


@dataclass(slots=True)
class Gap:
    """A time range (relative seconds) of a stream with no frames."""

    start: float
    end: float
    kind: str
    """`declared` (in the manifest's `gaps`: the archiver's own loss, counted, or frames it
    never received), `pause` (the stream resumed with a key frame) or `hole` (the next
    segment needs what is missing)."""
    reason: str = ""
    """A declared gap's reason: `segmenter_error`, `not_received`, ..."""
    references_missing: bool = False
    """(`not_received`) The frames after it refer to pictures inside it: until the next key
    frame they decode with artefacts."""
    undecoded: int | None = None
    """(Decoded, `references_missing`) How many listed frames after it, up to the next key
    frame, did not decode (FFmpeg conceals some away); None when not decoded."""


@dataclass(slots=True)
class DocumentReport:
    """One manifest and the objects it lists."""

    manifest_key: str
    participant_id: str | None = None
    type: str | None = None
    format: str | None = None
    status: str | None = None
    objects: int = 0
    bytes: int = 0
    start: float | None = None
    end: float | None = None
    frames: int | None = None
    """Frames the manifest lists (H.264: its segments' `frames`)."""
    decoded_frames: int | None = None
    """Of those, how many decoded (with `decode`; None when not decoded)."""
    gaps: list[Gap] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(slots=True)
class RecordingReport:
    bot_id: str
    recording_id: str
    documents: list[DocumentReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    """About the recording as a whole (its `session.json`)."""

    @property
    def ok(self) -> bool:
        return not self.problems and all(document.ok for document in self.documents)


@dataclass(slots=True)
class VerifyReport:
    recordings: list[RecordingReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.recordings) and all(recording.ok for recording in self.recordings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "recordings": [
                {
                    "ok": recording.ok,
                    **asdict(recording),
                    "documents": [
                        {"ok": document.ok, **asdict(document)} for document in recording.documents
                    ],
                }
                for recording in self.recordings
            ],
        }

    def lines(self) -> list[str]:
        """The report for a terminal: one line per document, then what is wrong with it."""
        out = []
        for recording in self.recordings:
            state = "intact" if recording.ok else "DAMAGED"
            out.append(f"{recording.bot_id}/{recording.recording_id}: {state}")
            out += [f"  problem: {p.detail}" for p in recording.problems]
            for document in recording.documents:
                what = " ".join(
                    str(part)
                    for part in (document.participant_id, document.type, document.format)
                    if part is not None
                )
                span = (
                    f" {document.start:.3f}-{document.end:.3f} s"
                    if document.start is not None and document.end is not None
                    else ""
                )
                decoded = (
                    f", {document.decoded_frames} of {document.frames} frames decode"
                    if document.decoded_frames is not None
                    else ""
                )
                out.append(
                    f"  {'ok' if document.ok else 'DAMAGED':8} {what or 'events'}"
                    f" ({document.status}, {document.objects} objects{span}{decoded})"
                )
                out += [f"    gap {_describe_gap(gap)}" for gap in document.gaps]
                out += [f"    {p.kind}: {p.detail}" for p in document.problems]
        if not self.recordings:
            out.append("no recordings found")
        return out


def _describe_gap(gap: Gap) -> str:
    details = [gap.reason] if gap.reason else []
    if gap.references_missing:
        details.append("frames after it refer to pictures inside it")
    if gap.undecoded:
        frames = "1 frame" if gap.undecoded == 1 else f"{gap.undecoded} frames"
        verb = "does" if gap.undecoded == 1 else "do"
        details.append(f"{frames} after it, up to the next key frame, {verb} not decode")
    return (
        f"{gap.start:.3f}-{gap.end:.3f} s ({gap.kind}{': ' if details else ''}{', '.join(details)})"
    )


class _Fetcher:
    """Fetches listed objects a few at a time and checks each against its entry."""

    def __init__(self, archive: Archive, report: DocumentReport) -> None:
        self.archive = archive
        self.report = report
        self.limit = asyncio.Semaphore(CONCURRENT_FETCHES)

    async def check(self, entry: dict[str, Any]) -> bytes | None:
        """The object, or None when it is missing; what is wrong with it is reported."""
        data, _ = await self.inspect(entry)
        return data

    async def inspect(self, entry: dict[str, Any]) -> tuple[bytes | None, bool]:
        """The object (None when missing) and whether it is intact."""
        key = entry["key"]
        async with self.limit:
            data = await self.archive.store.get(self.archive.relative(key))
        self.report.objects += 1
        if data is None:
            self.report.problems.append(Problem("missing", f"missing {key}", key))
            return None, False
        self.report.bytes += len(data)
        if len(data) != entry["bytes"]:
            self.report.problems.append(
                Problem("damaged", f"{key}: {len(data)} bytes, listed as {entry['bytes']}", key)
            )
            return data, False
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            self.report.problems.append(
                Problem("damaged", f"{key}: SHA-256 differs from the manifest's", key)
            )
            return data, False
        return data, True

    async def in_order(
        self, entries: Iterable[dict[str, Any]]
    ) -> AsyncIterator[tuple[dict[str, Any], bytes | None]]:
        """Each entry with its object when intact (None otherwise), in order, fetching a
        few ahead: only those few are held at a time."""
        ahead: deque[tuple[dict[str, Any], asyncio.Task[tuple[bytes | None, bool]]]] = deque()
        remaining = iter(entries)
        try:
            while True:
                while len(ahead) < CONCURRENT_FETCHES:
                    entry = next(remaining, None)
                    if entry is None:
                        break
                    ahead.append((entry, asyncio.ensure_future(self.inspect(entry))))
                if not ahead:
                    return
                entry, task = ahead.popleft()
                data, intact = await task
                yield entry, data if intact else None
        finally:
            for _, task in ahead:
                task.cancel()

    async def check_init(self, key: str) -> bytes | None:
        """Init segments are named by their content: `init-{first 16 hex of SHA-256}.mp4`.
        The init segment when it is intact."""
        async with self.limit:
            data = await self.archive.store.get(self.archive.relative(key))
        self.report.objects += 1
        if data is None:
            self.report.problems.append(Problem("missing", f"missing init segment {key}", key))
            return None
        self.report.bytes += len(data)
        if object_name(key) != init_name(hashlib.sha256(data).hexdigest()):
            self.report.problems.append(
                Problem("damaged", f"{key}: content does not match its name", key)
            )
            return None
        return data


def _starts_with_keyframe(segment: dict[str, Any]) -> bool:
    return bool(segment.get("starts_with_keyframe", True))


def _not_received(gaps: list[Gap], start: float, end: float) -> Gap | None:
    """The declared `not_received` gap that spans [start, end], if any."""
    for gap in gaps:
        if (
            gap.kind == "declared"
            and gap.reason == NOT_RECEIVED
            and gap.start <= start + CONTINUITY_TOLERANCE_S
            and gap.end >= end - CONTINUITY_TOLERANCE_S
        ):
            return gap
    return None


def _timeline(report: DocumentReport, segments: list[dict[str, Any]]) -> None:
    """Overlaps are problems; a hole before a segment that needs its predecessor too,
    unless the manifest declares it as frames never received (then that gap is the report);
    and a segment without a key frame that has nothing of its configuration before it."""
    if segments and not _starts_with_keyframe(segments[0]):
        first = segments[0]
        report.problems.append(
            Problem(
                "hole",
                f"{first['key']} does not start with a key frame, and no segment is listed "
                "before it",
                first["key"],
            )
        )
    for earlier, later in pairwise(segments):
        if not _starts_with_keyframe(later) and later["init_key"] != earlier["init_key"]:
            report.problems.append(
                Problem(
                    "hole",
                    f"{later['key']} does not start with a key frame, and the segment before "
                    "it has another init segment",
                    later["key"],
                )
            )
        if later["start"] < earlier["end"] - CONTINUITY_TOLERANCE_S:
            report.problems.append(
                Problem(
                    "overlap",
                    f"{later['key']} starts at {later['start']:.6f} s, before {earlier['key']} "
                    f"ends at {earlier['end']:.6f} s",
                    later["key"],
                )
            )
        elif later["start"] > earlier["end"] + CONTINUITY_TOLERANCE_S:
            if _not_received(report.gaps, earlier["end"], later["start"]) is not None:
                continue  # declared: reported as that gap
            independent = _starts_with_keyframe(later)
            gap = Gap(earlier["end"], later["start"], "pause" if independent else "hole")
            report.gaps.append(gap)
            if not independent:
                report.problems.append(
                    Problem(
                        "hole",
                        f"nothing between {gap.start:.6f} and {gap.end:.6f} s, and "
                        f"{later['key']} does not start with a key frame",
                        later["key"],
                    )
                )


class _Decoder:
    """Decodes an H.264 stream's segments as they are fed, in listed order, one run at a
    time (a segment with a key frame or a new init segment, and those that continue it),
    and counts the frames that decode in each segment by their time. Runs on a thread, one
    segment at a time: only the segment fed and the decoder's pictures are held."""

    def __init__(self, report: DocumentReport, inits: dict[str, bytes | None]) -> None:
        self.report = report
        self.inits = inits
        self.decoded = 0
        self._reset()

    def _reset(self) -> None:
        self.run: list[dict[str, Any]] = []
        self.starts: list[float] = []
        self.counts: list[int] = []
        self.errors: dict[int, str] = {}
        self.decoder: av.VideoCodecContext | None = None
        self.broken: tuple[int, str] | None = None
        """Where the run broke off: the index of the first segment not decoded and the
        missing or damaged object (it, or its init segment) the rest depends on."""

    def feed(self, segment: dict[str, Any], data: bytes | None) -> None:
        """One listed segment and its object (None when missing or damaged)."""
        if (
            not self.run
            or _starts_with_keyframe(segment)
            or segment["init_key"] != self.run[-1]["init_key"]
        ):
            self.finish()
        index = len(self.run)
        self.run.append(segment)
        self.starts.append(segment["start"])
        self.counts.append(0)
        if self.broken is not None:
            return
        init = self.inits.get(segment["init_key"])
        if init is None or data is None:
            self.broken = (index, segment["key"] if data is None else segment["init_key"])
            return
        try:
            with av.open(io.BytesIO(init + data), "r") as container:
                for packet in container.demux(container.streams.video[0]):
                    if not packet.size:
                        continue  # the demuxer's closing empty packet would drain the decoder
                    if self.decoder is None:
                        codec = packet.stream.codec_context
                        decoder = av.CodecContext.create(codec.name, "r")
                        assert isinstance(decoder, av.VideoCodecContext)
                        decoder.extradata = codec.extradata
                        self.decoder = decoder
                    self._count(self.decoder.decode(packet))
        except av.FFmpegError as exc:
            self.errors.setdefault(index, str(exc))

    def _count(self, images: list[av.VideoFrame]) -> None:
        for image in images:
            if image.pts is None or image.time_base is None:
                continue
            relative = float(image.pts * image.time_base)
            index = bisect_right(self.starts, relative + CONTINUITY_TOLERANCE_S) - 1
            if index >= 0 and relative < self.run[index]["end"] - CONTINUITY_TOLERANCE_S:
                self.counts[index] += 1
            else:
                where = max(index, 0)
                self.errors.setdefault(where, f"a frame at {relative:.6f} s, outside it")

    def finish(self) -> None:
        """The run so far is complete: drain the decoder and report what did not decode."""
        if self.decoder is not None:
            try:
                self._count(self.decoder.decode(None))
            except av.FFmpegError as exc:
                self.errors.setdefault(len(self.run) - 1, str(exc))
        self.decoded += sum(self.counts)
        not_decoded = 0
        for index, segment in enumerate(self.run):
            listed, decoded = segment["frames"], self.counts[index]
            if self.broken is not None and index >= self.broken[0]:
                if index > self.broken[0] or self.broken[1] != segment["key"]:
                    not_decoded += listed  # the missing object itself is reported already
                continue
            gap = self._concealing_gap(segment)
            if gap is not None and decoded < listed and index not in self.errors:
                gap.undecoded = (gap.undecoded or 0) + listed - decoded
            elif decoded != listed or index in self.errors:
                error = f" ({self.errors[index]})" if index in self.errors else ""
                self.report.problems.append(
                    Problem(
                        "undecodable",
                        f"{segment['key']}: lists {listed} frames, {decoded} decode{error}",
                        segment["key"],
                    )
                )
        if self.broken is not None and not_decoded:
            self.report.problems.append(
                Problem(
                    "undecodable",
                    f"{not_decoded} frames up to the next key frame not decoded: they depend "
                    f"on {self.broken[1]}",
                )
            )
        self._reset()

    def _concealing_gap(self, segment: dict[str, Any]) -> Gap | None:
        """The declared `not_received` gap, inside this run and before `segment`, whose
        missing pictures the frames of `segment` refer to."""
        found = None
        if not _starts_with_keyframe(self.run[0]):
            return None  # nothing of the run decodes: no gap's doing
        for gap in self.report.gaps:
            if (
                gap.kind == "declared"
                and gap.reason == NOT_RECEIVED
                and gap.references_missing
                and self.run[0]["start"] < gap.end <= segment["start"] + CONTINUITY_TOLERANCE_S
            ):
                found = gap
        return found


async def _verify_h264(
    report: DocumentReport, fetcher: _Fetcher, entries: list[dict[str, Any]], decode: bool
) -> None:
    inits = sorted({entry["init_key"] for entry in entries})
    found = await asyncio.gather(*(fetcher.check_init(key) for key in inits))
    decoder = _Decoder(report, dict(zip(inits, found, strict=True))) if decode else None
    async for entry, data in fetcher.in_order(entries):
        if decoder is not None:
            await asyncio.to_thread(decoder.feed, entry, data)
    if decoder is not None:
        await asyncio.to_thread(decoder.finish)
        report.decoded_frames = decoder.decoded
        for gap in report.gaps:
            if gap.references_missing and gap.undecoded is None:
                gap.undecoded = 0


async def _verify_audio(
    report: DocumentReport, fetcher: _Fetcher, entries: list[dict[str, Any]], decode: bool
) -> None:
    inits = sorted({entry["init_key"] for entry in entries})
    found = dict(zip(inits, await asyncio.gather(*map(fetcher.check_init, inits)), strict=True))
    decoded = 0
    async for entry, data in fetcher.in_order(entries):
        init = found.get(entry["init_key"])
        if not decode or data is None or init is None:
            continue
        try:
            first, samples = await asyncio.to_thread(decode_audio, init, data)
        except av.FFmpegError as exc:
            report.problems.append(Problem("undecodable", f"{entry['key']}: {exc}", entry["key"]))
            continue
        listed = entry["end_sample"] - entry["start_sample"]
        slack = 0 if entry.get("codec") == "flac" else OPUS_FRAME_SAMPLES
        if abs(len(samples) - listed) > slack or abs(first - entry["start_sample"]) > slack:
            report.problems.append(
                Problem(
                    "undecodable",
                    f"{entry['key']}: decodes to {len(samples)} samples at {first}, listed "
                    f"as {listed} at {entry['start_sample']}",
                    entry["key"],
                )
            )
            continue
        decoded += entry["chunks"]
    if decode:
        report.decoded_frames = decoded


async def verify_stream(
    archive: Archive, stream: StreamInfo, decode: bool = False
) -> DocumentReport:
    report = DocumentReport(
        archive.store.location(stream.manifest_key),
        stream.participant_id,
        stream.type,
        stream.format,
    )
    try:
        manifest = await archive.document(stream.manifest_key)
    except DamagedObjectError as exc:
        report.problems.append(
            Problem("damaged", f"manifest unreadable: {exc}", report.manifest_key)
        )
        return report
    if manifest is None:
        report.problems.append(Problem("missing", "no manifest", report.manifest_key))
        return report
    report.status = manifest.get("status")
    fetcher = _Fetcher(archive, report)
    report.gaps += [
        Gap(
            gap["start"],
            gap["end"],
            "declared",
            gap.get("reason", ""),
            bool(gap.get("references_missing", False)),
        )
        for gap in manifest.get("gaps", [])
    ]
    if stream.format == "h264":
        entries: list[dict[str, Any]] = manifest.get("segments", [])
        _timeline(report, entries)
        await _verify_h264(report, fetcher, entries, decode)
        listed = sum(entry["frames"] for entry in entries)
    elif stream.is_audio:
        entries = manifest.get("segments", [])
        _timeline(report, entries)
        await _verify_audio(report, fetcher, entries, decode)
        listed = sum(entry["chunks"] for entry in entries)
    else:
        entries = manifest.get("batches", [])
        bodies = await asyncio.gather(*(fetcher.check(entry) for entry in entries))
        for entry, body in zip(entries, bodies, strict=True):
            if body is not None:
                _check_png_batch(report, entry, body)
        for earlier, later in pairwise(entries):
            if later["start"] <= earlier["end"]:
                report.problems.append(
                    Problem("overlap", f"{later['key']} starts before {earlier['key']} ends")
                )
        listed = sum(entry["frame_count"] for entry in entries)
    report.frames = listed
    report.gaps.sort(key=lambda gap: gap.start)
    if entries:
        report.start, report.end = entries[0]["start"], entries[-1]["end"]
    report.problems += [Problem("order", detail) for detail in order_problems(entries)]
    report.problems += [
        Problem("counters", detail) for detail in counter_problems(manifest, listed)
    ]
    return report


def _check_png_batch(report: DocumentReport, batch: dict[str, Any], body: bytes) -> None:
    """Each listed frame lies inside the batch, at its offset, as a PNG."""
    frames = batch.get("frames", [])
    if len(frames) != batch.get("frame_count"):
        report.problems.append(
            Problem(
                "counters",
                f"{batch['key']}: {len(frames)} frames listed, not {batch.get('frame_count')}",
            )
        )
    for frame in frames:
        end = frame["offset"] + frame["size"]
        if end > len(body) or not body[frame["offset"] : end].startswith(PNG_SIGNATURE):
            report.problems.append(
                Problem(
                    "damaged", f"{batch['key']}: no PNG at {frame['name']}'s offset", batch["key"]
                )
            )


async def verify_events(archive: Archive, recording: RecordingId) -> DocumentReport | None:
    key = recording.events_manifest_key
    report = DocumentReport(archive.store.location(key))
    try:
        manifest = await archive.document(key)
    except DamagedObjectError as exc:
        report.problems.append(
            Problem("damaged", f"manifest unreadable: {exc}", report.manifest_key)
        )
        return report
    if manifest is None:
        return None
    report.status = manifest.get("status")
    batches: list[dict[str, Any]] = manifest.get("batches", [])
    fetcher = _Fetcher(archive, report)
    bodies = await asyncio.gather(*(fetcher.check(batch) for batch in batches))
    for batch, body in zip(batches, bodies, strict=True):
        lines = 0 if body is None else sum(1 for line in body.splitlines() if line)
        if body is not None and lines != batch["count"]:
            report.problems.append(
                Problem(
                    "damaged",
                    f"{batch['key']} holds {lines} events, not {batch['count']}",
                    batch["key"],
                )
            )
    report.problems += [Problem("order", detail) for detail in order_problems(batches)]
    return report


async def verify_recording(
    archive: Archive, recording: RecordingId, decode: bool = False
) -> RecordingReport:
    report = RecordingReport(recording.bot_id, recording.recording_id)
    streams = {stream.manifest_key: stream for stream in await archive.streams(recording)}
    try:
        session = await archive.session(recording)
    except DamagedObjectError as exc:
        session = None
        report.problems.append(
            Problem(
                "damaged",
                f"session.json unreadable: {exc}",
                archive.store.location(recording.session_key),
            )
        )
    for entry in [] if session is None else session.get("streams", []):
        key = entry.get("manifest_key", "")
        if key not in streams:
            stream = parse_stream_key(key)
            if stream is not None:
                streams[key] = stream  # listed in session.json: its absence is reported
    for key in sorted(streams):
        report.documents.append(await verify_stream(archive, streams[key], decode))
    events = await verify_events(archive, recording)
    if events is not None:
        report.documents.append(events)
    if session is None and not report.documents:
        report.problems.append(Problem("missing", "nothing archived for this recording"))
    return report


async def verify(
    archive: Archive,
    bot_id: str | None = None,
    recording_id: str | None = None,
    decode: bool = False,
) -> VerifyReport:
    """Verify one recording, a bot's recordings, or everything in the store; with `decode`,
    decode every H.264 stream too."""
    if bot_id is not None and recording_id is not None:
        recordings = [RecordingId(bot_id, recording_id)]
    else:
        recordings = await archive.recordings(bot_id)
    report = VerifyReport()
    for recording in recordings:
        report.recordings.append(await verify_recording(archive, recording, decode))
    return report


__all__ = [
    "DocumentReport",
    "Gap",
    "Problem",
    "RecordingReport",
    "VerifyReport",
    "counter_problems",
    "order_problems",
    "recording_of",
    "verify",
    "verify_recording",
    "verify_stream",
]
