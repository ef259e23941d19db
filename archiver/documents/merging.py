"""What a writer tells recovery about a document or journal (its header), and how two
versions of one document become one.

A stream's journal and every spooled object carry a header: its kind and ids, so that
recovery, or the spool sending a document to the fallback store, can rebuild the document
without the writer that made it. `merge_documents` takes two versions of a stream manifest,
an events manifest or a session index, and keeps everything either lists.
"""

from __future__ import annotations

from typing import Any

from archiver.documents.manifests import (
    MANIFEST_TYPES,
    EventBatchEntry,
    EventsManifest,
    dumps,
    parse_document,
)
from archiver.documents.sessions import SessionIndex
from archiver.layout import RecordingId, StreamId, recording_of
from archiver.values import RecordingContext


def events_header(recording: RecordingId) -> dict[str, Any]:
    """What recovery needs to know about a recording's events journal."""
    return {"kind": "events", "bot_id": recording.bot_id, "recording_id": recording.recording_id}


def stream_header(
    stream: StreamId, context: RecordingContext, participant: dict[str, Any]
) -> dict[str, Any]:
    """What recovery needs to know about a stream without its manifest."""
    return {
        "bot_id": stream.recording.bot_id,
        "recording_id": stream.recording.recording_id,
        "participant_id": stream.participant_id,
        "video_type": stream.source,
        "media_format": stream.media_format,
        "context": {
            "bot": context.bot,
            "recording": context.recording,
            "realtime_endpoint": context.realtime_endpoint,
            "video_separate": context.video_separate,
            "audio_separate": context.audio_separate,
        },
        "participant": participant,
    }


def stream_from_header(
    header: dict[str, Any],
) -> tuple[StreamId, RecordingContext, dict[str, Any]]:
    """The stream, its recording's context and its participant that `stream_header` gave."""
    stream = StreamId(
        RecordingId(header["bot_id"], header["recording_id"]),
        header["participant_id"],
        header["video_type"],
        header["media_format"],
    )
    return stream, RecordingContext(**header["context"]), header["participant"]


def document_header(key: str, document: dict[str, Any] | None) -> dict[str, Any]:
    """What recovery (and merging) needs to know about a stored document: its kind and ids;
    empty when it is none the service writes."""
    recording = recording_of(key)
    if document is None or recording is None:
        return {}
    if key == recording.session_key:
        return {**events_header(recording), "kind": "session"}
    if key == recording.events_manifest_key:
        return events_header(recording)
    if document.get("format") in MANIFEST_TYPES:
        return {
            "bot_id": document["bot"]["id"],
            "recording_id": document["recording"]["id"],
            "participant_id": str(document["participant"]["id"]),
            "video_type": document["type"],
            "media_format": document["format"],
            "context": {
                "bot": document["bot"],
                "recording": document["recording"],
                "realtime_endpoint": document.get("realtime_endpoint"),
                "video_separate": document.get("video_separate"),
                "audio_separate": document.get("audio_separate"),
            },
            "participant": document["participant"],
        }
    return {}


def merge_documents(key: str, ours: bytes, theirs: bytes) -> bytes:
    """One document from two versions of it (a stream manifest, an events manifest or a
    session index): everything either lists, the way a conditional write that lost takes
    in the winner's. The status and counters are those of the newer version. A version
    that does not parse counts as absent."""
    mine, other = parse_document(ours, key), parse_document(theirs, key)
    if mine is None or other is None:
        return ours if other is None else theirs
    if str(other.get("updated_at", "")) > str(mine.get("updated_at", "")):
        mine, other = other, mine
    header = document_header(key, mine)
    kind = header.get("kind")
    if not header:
        return dumps(mine)
    recording = RecordingId(header["bot_id"], header["recording_id"])
    if kind == "session":
        index = SessionIndex(recording)
        index.resume(mine)  # The first version taken in wins where both name a stream.
        index.resume(other)
        return dumps(index.document())
    if kind == "events":
        events = EventsManifest(recording, mine)
        events.merge([EventBatchEntry(**batch) for batch in other.get("batches", [])])
        events.status = mine.get("status", "interrupted")
        return dumps(events.document({}))
    stream, context, participant = stream_from_header(header)
    manifest = MANIFEST_TYPES[stream.media_format](stream, context, participant, mine)
    manifest.merge([manifest.entry_from(d) for d in other.get(manifest.entries_name, [])])
    manifest.status = mine.get("status", "interrupted")
    return dumps(manifest.document({}))
