"""Every recording's events log in this process: the receive loop's one door to them."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from archiver.events.log import EventLog, QueueBudget
from archiver.layout import RecordingId
from archiver.recovery.spooling import Recovery
from archiver.settings import Settings
from archiver.store.spool import Spool
from archiver.values import EventMessage

if TYPE_CHECKING:
    from archiver.recordings.sessions import SessionWriter


class EventArchive:
    """Every recording's events log in this process; the receive loop's only door to them.
    A log is dropped once it has nothing left to write and no connection carries it."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        sessions: SessionWriter,
        recovery: Recovery | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.sessions = sessions
        self.recovery = recovery
        self.logs: dict[RecordingId, EventLog] = {}
        self.budget = QueueBudget(
            settings.events_queued_bytes_per_recording, settings.events_queued_bytes
        )

    def _log(self, recording: RecordingId) -> EventLog:
        event_log = self.logs.get(recording)
        if event_log is None:
            event_log = self.logs[recording] = EventLog(
                recording,
                self.settings,
                self.spool,
                self.sessions,
                self.recovery,
                self.budget,
                self._done,
            )
            self.sessions.hold(recording)
        return event_log

    def attach(self, recording: RecordingId) -> None:
        """A connection carries events of `recording`; its log ends when the last one ends."""
        self._log(recording).users += 1

    def append(self, recording: RecordingId, message: EventMessage) -> None:
        self._log(recording).append(message)

    def skip_audio(self, recording: RecordingId) -> None:
        self._log(recording).skip_audio()

    def quiet(self, recording: RecordingId) -> bool:
        """Whether the recording's log has no open batch and none waiting for the spool."""
        event_log = self.logs.get(recording)
        return event_log is None or event_log.quiet

    async def room(self, recording: RecordingId) -> bool:
        """Wait while the recording's closed batches (or everyone's) are over their budget;
        return whether it had to."""
        event_log = self.logs.get(recording)
        if event_log is None or not self.budget.over(event_log):
            return False
        await self.budget.wait(event_log)
        return True

    def release(self, recordings: set[RecordingId]) -> None:
        """Connection end: a log no connection carries any more closes its batch and
        completes its manifest."""
        for recording in recordings:
            event_log = self.logs.get(recording)
            if event_log is None:
                continue
            event_log.users = max(0, event_log.users - 1)
            if not event_log.users:
                event_log.end()
        self._forget_idle()

    def end_all(self) -> None:
        """Shutdown: close every open batch and complete every manifest."""
        for event_log in list(self.logs.values()):
            event_log.end()

    async def wait_idle(self) -> None:
        """Wait until every log's writer has finished, then forget the idle logs (a later
        connection continues from the stored manifest)."""
        while tasks := [e.task for e in self.logs.values() if e.running and e.task]:
            await asyncio.wait(tasks)
        self._forget_idle()

    def _done(self, event_log: EventLog) -> None:
        """A log's writer finished with nothing left and no connection: forget it."""
        if self.logs.get(event_log.recording) is event_log:
            del self.logs[event_log.recording]
            self.sessions.release(event_log.recording)

    def _forget_idle(self) -> None:
        """Drop logs with nothing left to write, so memory follows the live recordings."""
        for event_log in [e for e in self.logs.values() if e.idle and not e.unwritten]:
            self._done(event_log)

    def tasks(self) -> list[asyncio.Task[Any]]:
        return [t for event_log in self.logs.values() for t in event_log.tasks()]

    def stop(self) -> None:
        for event_log in self.logs.values():
            event_log.stop()

    def unfinished(self) -> list[str]:
        """Manifest keys of events logs still being written out."""
        return [e.recording.events_manifest_key for e in self.logs.values() if e.running]
