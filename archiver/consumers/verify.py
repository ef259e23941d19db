"""Check a recording in the store against its manifests, without decoding anything.

For every stream manifest and the events manifest: every listed object (and init segment)
is present with the size and SHA-256 its manifest gives; the objects are listed in order;
segments neither overlap nor leave a hole a later segment depends on; the counters add up.
Gaps in a stream's timeline are reported with their time ranges: those the archiver
declared (its own failures, in the manifest's `gaps`), pauses (the next segment starts with
a key frame, so nothing after them is lost), and holes (the next segment needs what is
missing, so it cannot decode), which alone make the stream damaged.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

from archiver.consumers.reader import Archive, StreamInfo, parse_stream_key, recording_of
from archiver.errors import DamagedObjectError
from archiver.layout import RecordingId
from archiver.playlists import CONTINUITY_TOLERANCE_S

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONCURRENT_FETCHES = 8


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
    """`missing`, `damaged`, `order`, `overlap`, `hole`, `counters` or `document`."""
    detail: str
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Gap:
    """A time range (relative seconds) of a stream with no frames."""

    start: float
    end: float
    kind: str
    """`declared` (the archiver's own loss, counted), `pause` (the stream resumed with a key
    frame) or `hole` (the next segment needs what is missing)."""
    reason: str = ""


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
                out.append(
                    f"  {'ok' if document.ok else 'DAMAGED':8} {what or 'events'}"
                    f" ({document.status}, {document.objects} objects{span})"
                )
                out += [
                    f"    gap {gap.start:.3f}-{gap.end:.3f} s ({gap.kind}"
                    f"{': ' + gap.reason if gap.reason else ''})"
                    for gap in document.gaps
                ]
                out += [f"    {p.kind}: {p.detail}" for p in document.problems]
        if not self.recordings:
            out.append("no recordings found")
        return out


class _Fetcher:
    """Fetches listed objects a few at a time and checks each against its entry."""

    def __init__(self, archive: Archive, report: DocumentReport) -> None:
        self.archive = archive
        self.report = report
        self.limit = asyncio.Semaphore(CONCURRENT_FETCHES)

    async def check(self, entry: dict[str, Any]) -> bytes | None:
        key = entry["key"]
        async with self.limit:
            data = await self.archive.store.get(self.archive.relative(key))
        self.report.objects += 1
        if data is None:
            self.report.problems.append(Problem("missing", f"missing {key}", key))
            return None
        self.report.bytes += len(data)
        if len(data) != entry["bytes"]:
            self.report.problems.append(
                Problem("damaged", f"{key}: {len(data)} bytes, listed as {entry['bytes']}", key)
            )
        elif hashlib.sha256(data).hexdigest() != entry["sha256"]:
            self.report.problems.append(
                Problem("damaged", f"{key}: SHA-256 differs from the manifest's", key)
            )
        return data

    async def check_init(self, key: str) -> None:
        """Init segments are named by their content: `init-{first 16 hex of SHA-256}.mp4`."""
        async with self.limit:
            data = await self.archive.store.get(self.archive.relative(key))
        self.report.objects += 1
        if data is None:
            self.report.problems.append(Problem("missing", f"missing init segment {key}", key))
            return
        self.report.bytes += len(data)
        name = key.rpartition("/")[2]
        if name != f"init-{hashlib.sha256(data).hexdigest()[:16]}.mp4":
            self.report.problems.append(
                Problem("damaged", f"{key}: content does not match its name", key)
            )


def _timeline(report: DocumentReport, segments: list[dict[str, Any]]) -> None:
    """Overlaps are problems; a hole before a segment that needs its predecessor too."""
    for earlier, later in pairwise(segments):
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
            independent = later.get("starts_with_keyframe", True)
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


async def verify_stream(archive: Archive, stream: StreamInfo) -> DocumentReport:
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
        Gap(gap["start"], gap["end"], "declared", gap.get("reason", ""))
        for gap in manifest.get("gaps", [])
    ]
    if stream.format == "h264":
        entries: list[dict[str, Any]] = manifest.get("segments", [])
        inits = sorted({entry["init_key"] for entry in entries})
        await asyncio.gather(*(fetcher.check_init(key) for key in inits))
        await asyncio.gather(*(fetcher.check(entry) for entry in entries))
        _timeline(report, entries)
        listed = sum(entry["frames"] for entry in entries)
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


async def verify_recording(archive: Archive, recording: RecordingId) -> RecordingReport:
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
        report.documents.append(await verify_stream(archive, streams[key]))
    events = await verify_events(archive, recording)
    if events is not None:
        report.documents.append(events)
    if session is None and not report.documents:
        report.problems.append(Problem("missing", "nothing archived for this recording"))
    return report


async def verify(
    archive: Archive, bot_id: str | None = None, recording_id: str | None = None
) -> VerifyReport:
    """Verify one recording, a bot's recordings, or everything in the store."""
    if bot_id is not None and recording_id is not None:
        recordings = [RecordingId(bot_id, recording_id)]
    else:
        recordings = await archive.recordings(bot_id)
    report = VerifyReport()
    for recording in recordings:
        report.recordings.append(await verify_recording(archive, recording))
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
