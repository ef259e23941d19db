"""Validated ids and the object keys built from them: the archive's layout in one place.

Keys are built from ids only, never from names or other free text, and every id is checked
against a strict character set first, so no message can steer a write outside its prefix.
Keys are read back here too (`stream_of`, `recording_of`): whoever lists the archive learns
what a key is from the module that names it. So is the spool folder on the local disk laid
out here (`SpoolFolders`), for every part of the service that keeps something there.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from archiver.errors import InvalidIdError

VideoType = Literal["webcam", "screenshare"]
Source = Literal["webcam", "screenshare", "audio"]
"""What a stream carries of its participant: a camera, a shared screen, or their voice."""
MediaFormat = Literal["h264", "png", "flac", "opus"]
AudioFormat = Literal["flac", "opus"]
AUDIO_FORMATS: frozenset[MediaFormat] = frozenset({"flac", "opus"})
_SOURCES: dict[str, Source] = {"webcam": "webcam", "screenshare": "screenshare", "audio": "audio"}
_MEDIA_FORMATS: dict[str, MediaFormat] = {
    "h264": "h264",
    "png": "png",
    "flac": "flac",
    "opus": "opus",
}
MANIFEST_NAME = "manifest.json"
PLAYLIST_NAME = "playlist.m3u8"
SESSION_NAME = "session.json"
INIT_NAME = re.compile(r"init-[0-9a-f]{16}\.mp4")
"""An init segment's name, as `init_name` gives it."""

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_MAX_LOCAL_NAME = 200
"""Bytes of a local file or folder name built from ids; filesystems allow 255."""


_KEY_MICROS_MAX = 10**13 - 1


def key_micros(relative_s: float | None) -> int:
    """A relative time as the 13 zero-padded digits of microseconds that key names sort by;
    a time no meeting has (negative, absurd, not finite) sorts first rather than failing."""
    if relative_s is None or not 0 <= relative_s <= _KEY_MICROS_MAX / 1_000_000:
        return 0
    return round(relative_s * 1_000_000)


def conflict_key(key: str, sha256: str) -> str:
    """Where an object goes whose own key already holds other bytes (another writer won a
    race for it): its name tagged with the first 16 hex digits of its SHA-256, so that it
    sorts right after the other; a name that ends with those already (an init segment's,
    named by its content) takes the next 16. A key tagged with the last of these is its own
    answer: a second conflict there is not moved again."""
    folder, _, name = key.rpartition("/")
    base, dot, extension = name.partition(".")
    first, second = f"-{sha256[:16]}", f"-{sha256[16:32]}"
    if base.endswith(second):
        return key
    tag = second if base.endswith(first) else first
    return f"{folder}/{base}{tag}{dot}{extension}" if folder else f"{base}{tag}{dot}{extension}"


def local_name(prefix: str) -> str:
    """A flat, collision-free local name for an object prefix. Ids may be 128 characters
    each, so a long prefix keeps a readable start and ends in a hash of the whole."""
    flat = prefix.replace("/", "~")
    if len(flat) <= _MAX_LOCAL_NAME:
        return flat
    digest = hashlib.sha256(flat.encode()).hexdigest()[:32]
    return f"{flat[: _MAX_LOCAL_NAME - len(digest) - 1]}~{digest}"


def safe_id(field: str, value: object) -> str:
    """Return `value` as a key-safe id, or raise `InvalidIdError` naming `field`."""
    if isinstance(value, bool):
        raise InvalidIdError(field, value)
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not _SAFE_ID.fullmatch(value):
        raise InvalidIdError(field, value)
    return value


@dataclass(frozen=True, slots=True)
class RecordingId:
    """One recording of one bot: the unit a `session.json` describes."""

    bot_id: str
    recording_id: str

    @property
    def prefix(self) -> str:
        return f"{self.bot_id}/{self.recording_id}"

    @property
    def session_key(self) -> str:
        return f"{self.prefix}/{SESSION_NAME}"

    @property
    def events_manifest_key(self) -> str:
        return f"{self.prefix}/events/{MANIFEST_NAME}"

    def ready_key(self, seq: int) -> str:
        """The marker of the recording's `seq`-th completion: created once (a conditional
        write), by the one task that sends its notice."""
        return f"{self.prefix}/notices/{seq:04d}.ready.json"

    def delivery_key(self, seq: int) -> str:
        """How that completion's notice was delivered, written once it is known."""
        return f"{self.prefix}/notices/{seq:04d}.delivery.json"

    def events_batch_key(self, first_micros: int, seq: int, writer: str) -> str:
        """Events batches are named by their first event's relative time (microseconds),
        their place in the recording's sequence and the process that wrote them: time-ordered,
        and unique even when two machines hold the recording at once."""
        return f"{self.prefix}/events/{first_micros:013d}-{seq:06d}-{writer}.jsonl"

    def recovered_events_batch_key(self, first_micros: int, journal_name: str) -> str:
        """A batch rebuilt after a crash, before its place in the sequence is known."""
        return f"{self.prefix}/events/{first_micros:013d}-recovered-{journal_name}.jsonl"

    def participant_folder(self, participant_id: str) -> str:
        return f"{self.prefix}/participants/{participant_id}"

    def participant_playlist_key(self, participant_id: str) -> str:
        """A participant's multivariant playlist: their webcam with their audio."""
        return f"{self.participant_folder(participant_id)}/{PLAYLIST_NAME}"

    @property
    def journal_name(self) -> str:
        """A flat, collision-free folder name for this recording's events journal."""
        return local_name(f"{self.prefix}/events")


@dataclass(frozen=True, slots=True)
class StreamId:
    """One participant's webcam, screenshare or audio in one format: the unit of a manifest."""

    recording: RecordingId
    participant_id: str
    source: Source
    media_format: MediaFormat

    @property
    def prefix(self) -> str:
        return (
            f"{self.recording.participant_folder(self.participant_id)}"
            f"/{self.source}/{self.media_format}"
        )

    @property
    def manifest_key(self) -> str:
        return f"{self.prefix}/{MANIFEST_NAME}"

    @property
    def playlist_key(self) -> str:
        """The HLS playlist of an H.264 or audio stream, beside its manifest."""
        return f"{self.prefix}/{PLAYLIST_NAME}"

    def init_key(self, content_sha256: str) -> str:
        """Init segments are named by content: one object per SPS/PPS configuration."""
        return f"{self.prefix}/{init_name(content_sha256)}"

    def segment_key(self, start_ticks: int) -> str:
        """Segments are named by start time (90 kHz ticks for video, samples for audio),
        unique across reconnects."""
        return f"{self.prefix}/segments/{start_ticks:013d}.m4s"

    def batch_key(self, start_micros: int) -> str:
        """PNG batches are named by their first frame's time (microseconds), unique across
        reconnects."""
        return f"{self.prefix}/batches/{start_micros:013d}.tar"

    @property
    def journal_name(self) -> str:
        """A flat, collision-free folder name for this stream's journal."""
        return local_name(self.prefix)

    def __str__(self) -> str:
        return self.prefix


def init_name(content_sha256: str) -> str:
    """The name of the init segment whose SHA-256 (hex) is `content_sha256`."""
    return f"init-{content_sha256[:16]}.mp4"


def object_name(key: str) -> str:
    """The last part of a key: what kind of object it is (`manifest.json`, a segment)."""
    return key.rpartition("/")[2]


def beside(key: str, name: str) -> str:
    """The key of the object called `name` in the folder of `key`."""
    return f"{key.rpartition('/')[0]}/{name}"


def _ids(parts: list[str]) -> RecordingId | None:
    try:
        return RecordingId(safe_id("bot_id", parts[0]), safe_id("recording_id", parts[1]))
    except InvalidIdError:
        return None


def recording_of(key: str) -> RecordingId | None:
    """The recording whose `session.json`, events or stream a key belongs to; None for any
    other key."""
    parts = key.split("/")
    if len(parts) == 3 and parts[2] == SESSION_NAME:
        return _ids(parts)
    if len(parts) >= 4 and parts[2] in ("participants", "events"):
        return _ids(parts)
    return None


def stream_of(manifest_key: str) -> StreamId | None:
    """The stream whose manifest this is (`{bot}/{recording}/participants/{participant}/
    {source}/{format}/manifest.json`); None for any other key."""
    parts = manifest_key.split("/")
    if len(parts) != 7 or parts[2] != "participants" or parts[6] != MANIFEST_NAME:
        return None
    recording = _ids(parts)
    source = _SOURCES.get(parts[4])
    media_format = _MEDIA_FORMATS.get(parts[5])
    if recording is None or source is None or media_format is None:
        return None
    if (source == "audio") != (media_format in AUDIO_FORMATS):
        return None
    try:
        participant = safe_id("participant_id", parts[3])
    except InvalidIdError:
        return None
    return StreamId(recording, participant, source, media_format)


SLOT_NAME = re.compile(r"worker-(\d+)")
"""A worker's own part of the spool: `worker-{number}`, with `worker-{number}.lock` beside it."""


@dataclass(frozen=True, slots=True)
class SpoolFolders:
    """What the service keeps where in a spool folder (a worker's slot, or the whole spool
    of a process that has no slots): spooled objects, journals, and the recordings waiting
    out their grace."""

    root: Path

    @property
    def objects(self) -> Path:
        """Spooled objects and their records, until the store confirms them."""
        return self.root / "objects"

    @property
    def journals(self) -> Path:
        """One folder per stream or events log: what it received but has not spooled yet."""
        return self.root / "journal"

    def journal(self, name: str) -> Path:
        """The journal of one stream or events log (`StreamId.journal_name`)."""
        return self.journals / name

    @property
    def unrecoverable(self) -> Path:
        """Journals that recovery could not read, set aside for a person to look at."""
        return self.root / "journal-unrecoverable"

    @property
    def waiting(self) -> Path:
        """One small file per recording waiting out its grace before it completes."""
        return self.root / "waiting"

    @property
    def in_use(self) -> bool:
        """Whether anything was ever spooled or journaled here."""
        return self.objects.is_dir() or self.journals.is_dir()

    def slot(self, number: int) -> SpoolFolders:
        """Worker `number`'s part of this spool."""
        return SpoolFolders(self.root / f"worker-{number}")

    def lock_of(self, folder: Path) -> Path:
        """The lock file a worker holds while it owns `folder` (a slot, or this root)."""
        return self.root / ("legacy.lock" if folder == self.root else f"{folder.name}.lock")
