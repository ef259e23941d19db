"""Where an H.264 stream that lands without decoder state picks up its GOP.

A reconnect to another worker or task, or a deploy, brings a stream's next frames to a
process that never saw its last key frame. Senders do not restart their encoder for it, so
those frames continue mid-GOP: they decode only with the SPS/PPS the stream was using. That
configuration is read, in order of freshness, from a sibling worker's journal of the open
segment (same task: `archiver.host.workers`), or from the init segment of the last segment the
stored manifest lists; when neither is readable yet, the archive is polled while the
segmenter holds the frames (the previous task may still be storing that segment).
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from structlog.typing import FilteringBoundLogger

from archiver.documents.manifests import (
    SegmentEntry,
    StreamManifest,
    frame_interval_s,
    parse_document,
)
from archiver.errors import MediaError, StoreError
from archiver.host.workers import sibling_slots
from archiver.layout import INIT_NAME, SpoolFolders, StreamId, object_name
from archiver.segmenting.fmp4 import MIN_GAP_TICKS, TIMESCALE, configuration_of
from archiver.segmenting.h264 import StreamConfig
from archiver.settings import Settings
from archiver.store.journal import first_config
from archiver.store.spool import Spool

POLL_S = 0.25
"""The first wait before the archive is read again; it doubles up to `POLL_MAX_S`."""
POLL_MAX_S = 2.0


@dataclass(frozen=True, slots=True)
class Continuation:
    """A configuration to continue a stream with, and where it came from."""

    config: StreamConfig
    continues_at: int | None
    """Where the archive this continues ends (90 kHz ticks); None for a live sibling."""
    source: Literal["sibling_worker", "archive"]
    gap_ticks: int = MIN_GAP_TICKS
    """Frames count as not received when the next one comes later than this after
    `continues_at`: half the archive's last frame interval."""


class ContinuationFinder:
    """Reads what one stream needs to continue, from its sibling workers and its archive."""

    def __init__(
        self, stream: StreamId, settings: Settings, spool: Spool, log: FilteringBoundLogger
    ) -> None:
        self.stream = stream
        self.spool = spool
        self.log = log
        self.siblings = sibling_slots(Path(settings.spool_dir))

    async def find(self, listed: SegmentEntry | None) -> Continuation | None:
        """The freshest configuration: a sibling's open segment, unless `listed` (the last
        listed segment) started later."""
        live = await asyncio.to_thread(self._sibling_configuration)
        if live is not None and (listed is None or live[1] >= round(listed.start * TIMESCALE)):
            return Continuation(live[0], None, "sibling_worker")
        if listed is None:
            return None
        stored = await self._stored_configuration(listed)
        if stored is None:
            return None
        gap_ticks = round(frame_interval_s(listed) * TIMESCALE / 2)
        return Continuation(stored, round(listed.end * TIMESCALE), "archive", gap_ticks)

    async def poll(self, waiting: Callable[[], bool], deadline_s: float) -> Continuation | None:
        """Look again, backing off, while `waiting()` and within `deadline_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        delay_s = POLL_S
        while loop.time() < deadline and waiting():
            await asyncio.sleep(min(delay_s, max(0.0, deadline - loop.time())))
            delay_s = min(2 * delay_s, POLL_MAX_S)
            if not waiting():
                break
            found = await self.find(await self.latest_listed())
            if found is not None:
                return found
        return None

    async def latest_listed(self) -> SegmentEntry | None:
        """The last segment the stored manifest lists now (another writer may have listed
        more since the stream read it)."""
        try:
            fetched = await self.spool.fetch(self.stream.manifest_key)
        except StoreError as exc:
            self.log.warning("previous_manifest_unreadable", error=str(exc))
            return None
        document = None if fetched is None else parse_document(fetched[0], "manifest.json")
        segments = [] if document is None else document.get("segments")
        if not isinstance(segments, list) or not segments or not isinstance(segments[-1], dict):
            return None
        try:
            return StreamManifest.entry_from_document(segments[-1])
        except (TypeError, ValueError):
            return None

    async def another_writer_holds_it(self, previous: dict[str, Any] | None) -> bool:
        """Whether another writer may hold the stream's open GOP now: a sibling worker
        journals it, its stored manifest (`previous`) is live, or (none stored yet) its
        recording's `session.json` lists it as live."""
        if await asyncio.to_thread(self._held_by_a_sibling):
            return True
        if previous is not None:
            return previous.get("status") == "live"
        try:
            fetched = await self.spool.fetch(self.stream.recording.session_key)
        except StoreError:
            return False
        session = None if fetched is None else parse_document(fetched[0], "session.json")
        streams = [] if session is None else session.get("streams")
        return isinstance(streams, list) and any(
            isinstance(entry, dict)
            and entry.get("manifest_key") == self.stream.manifest_key
            and entry.get("status") == "live"
            for entry in streams
        )

    def _journal_folders(self) -> list[Path]:
        return [SpoolFolders(slot).journal(self.stream.journal_name) for slot in self.siblings]

    def _held_by_a_sibling(self) -> bool:
        return any(folder.is_dir() for folder in self._journal_folders())

    def _sibling_configuration(self) -> tuple[StreamConfig, int] | None:
        """The configuration, and start, of the stream's open segment on a sibling worker
        (runs on a thread: it reads their journals, only the first record of each)."""
        found: tuple[StreamConfig, int] | None = None
        for folder in self._journal_folders():
            for path in sorted(folder.glob("*.jnl"), reverse=True)[:1]:
                try:
                    record = first_config(path)
                    config = None if record is None else StreamConfig.from_record(record)
                    start = int(path.stem)
                except (OSError, ValueError, KeyError, TypeError, binascii.Error):
                    continue  # its segment closed meanwhile, or not one we can read
                if config is not None and (found is None or start > found[1]):
                    found = (config, start)
        return found

    async def _stored_configuration(self, entry: SegmentEntry) -> StreamConfig | None:
        """The configuration of a listed segment, from its init segment; None when that
        cannot be trusted to describe it (then the stream waits for a key frame)."""
        name = object_name(entry.init_key)
        if not INIT_NAME.fullmatch(name):
            self.log.warning("init_segment_unusable", init_key=entry.init_key)
            return None
        try:
            init = await self.spool.get(f"{self.stream.prefix}/{name}")
        except StoreError as exc:
            self.log.warning("init_segment_unreadable", error=str(exc))
            return None
        if init is None or hashlib.sha256(init).hexdigest()[:16] != name[5:21]:
            self.log.warning("init_segment_unusable", init_key=entry.init_key)
            return None
        try:
            config = await asyncio.to_thread(configuration_of, init)
        except MediaError as exc:
            self.log.warning("init_segment_unusable", init_key=entry.init_key, error=str(exc))
            return None
        # Init segments written before they carried the sender's SPS/PPS describe another.
        described = (config.codec, config.width, config.height)
        if described != (entry.codec, entry.width, entry.height):
            self.log.warning("init_segment_unusable", init_key=entry.init_key, codec=config.codec)
            return None
        return config
