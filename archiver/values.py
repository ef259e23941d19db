"""The plain values that cross stages: what a websocket message means, once parsed, and
what a token allows. Every stage may import this module; it imports only the ground floor
(`layout`), so no stage has to import the one that produces its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from archiver.layout import RecordingId, StreamId


@dataclass(frozen=True, slots=True)
class RecordingContext:
    """The customer's ids and metadata for joining the archive to their own records."""

    bot: dict[str, Any]
    recording: dict[str, Any]
    realtime_endpoint: dict[str, Any] | None
    video_separate: dict[str, Any] | None
    audio_separate: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class MediaMessage:
    """One access unit, PNG or audio chunk for one stream, its payload still base64."""

    stream: StreamId
    buffer_b64: str
    relative_s: float
    absolute: datetime
    participant: dict[str, Any]
    context: RecordingContext


@dataclass(frozen=True, slots=True)
class EventMessage:
    """Any other event; routed by recording and participant when the message names them."""

    event: str
    recording: RecordingId | None
    participant_id: str | None
    body: dict[str, Any]
    raw: bytes
    """The message exactly as received, for the events archive."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What an accepted token allows."""

    kind: Literal["static", "ingest", "view"]
    bot_id: str | None = None
    """The one bot an ingest token writes for (None: bound on first use), or whose
    recording a viewer token opens."""
    recording_id: str | None = None
    """The one recording a viewer token opens."""
    binding: str | None = None
    """An unbound ingest token's name for its durable binding (hex, from its signature)."""
    expiry: float | None = None
    """When a signed token stops being accepted (Unix time)."""

    def opens(self, bot_id: str, recording_id: str) -> bool:
        """Whether the viewer may show this recording with it: a static token opens every
        one (local use), a viewer token its own, an ingest token none."""
        if self.kind == "static":
            return True
        return self.kind == "view" and (self.bot_id, self.recording_id) == (bot_id, recording_id)
