"""The thread side of a stream: what its worker hands to a thread for each batch.

Base64, the timestamp guard and the segmenter run here, off the event loop, one batch of
one stream at a time; the worker owns the segmenter, guard and journal and passes them in.
Nothing raised here escapes: every frame's fate is counted and comes back in a
`BatchResult`, which the worker takes in on the loop.
"""

from __future__ import annotations

import base64
import binascii
import traceback
from dataclasses import dataclass
from typing import Any, Generic

from archiver.errors import InputError, MediaError, SegmenterFailure
from archiver.segmenting.base import FinishedT, Segmenter
from archiver.segmenting.timestamps import Timed, TimestampGuard
from archiver.store.journal import StreamJournal
from archiver.values import MediaMessage


def decode(buffer_b64: str) -> bytes:
    try:
        return base64.b64decode(buffer_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError("bad_base64", str(exc)) from exc


def describe_error(exc: BaseException) -> str:
    """An exception and where it was raised, for a log line that must lead to the bug."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{exc!r}{where}"


@dataclass(frozen=True, slots=True)
class BatchResult(Generic[FinishedT]):
    finished: list[FinishedT]
    rejected: list[InputError]
    counters: dict[str, int]
    held_frames: int
    gaps: list[dict[str, Any]]


def segment(
    segmenter: Segmenter[FinishedT],
    guard: TimestampGuard[bytes],
    journal: StreamJournal | None,
    batch: list[MediaMessage],
) -> BatchResult[FinishedT]:
    """Base64, timestamp checks and segmenting for a batch of one stream."""
    finished: list[FinishedT] = []
    rejected: list[InputError] = []
    for message in batch:
        try:
            data = decode(message.buffer_b64)
            judged = guard.admit(data, message.relative_s, message.absolute)
        except InputError as exc:
            segmenter.reject(exc.reason)
            rejected.append(exc)
            continue
        except Exception as exc:  # noqa: BLE001 (a bug of ours: this frame only)
            segmenter.reject("worker_error")
            rejected.append(InputError("worker_error", describe_error(exc)))
            continue
        _push(segmenter, judged, finished, rejected)
    if journal is not None:
        journal.flush()
    return _result(segmenter, guard, finished, rejected)


def flush(
    segmenter: Segmenter[FinishedT],
    guard: TimestampGuard[bytes],
    journal: StreamJournal | None,
) -> BatchResult[FinishedT]:
    """Close what is open, at the end of a run, with the first frames the guard still holds
    (a stream that ended before its start was confirmed)."""
    finished: list[FinishedT] = []
    rejected: list[InputError] = []
    _push(segmenter, guard.release(), finished, rejected)
    if journal is not None:
        journal.flush()
    finished.extend(segmenter.flush())
    return _result(segmenter, guard, finished, rejected)


def _push(
    segmenter: Segmenter[FinishedT],
    judged: list[Timed[bytes]],
    finished: list[FinishedT],
    rejected: list[InputError],
) -> None:
    """Frames the guard has judged into the segmenter; those it refused are counted."""
    for frame in judged:
        if frame.error is not None:
            segmenter.reject(frame.error.reason)
            rejected.append(frame.error)
            continue
        try:
            finished.extend(segmenter.push(frame.item, frame.relative_s, frame.absolute))
        except SegmenterFailure as exc:
            finished.extend(exc.salvaged)
            rejected.append(exc)
        except InputError as exc:  # counted by the segmenter
            rejected.append(exc)
        except Exception as exc:  # noqa: BLE001 (a bug of ours: this frame only)
            segmenter.reject("worker_error")
            rejected.append(InputError("worker_error", describe_error(exc)))


def _result(
    segmenter: Segmenter[FinishedT],
    guard: TimestampGuard[bytes],
    finished: list[FinishedT],
    rejected: list[InputError],
) -> BatchResult[FinishedT]:
    gaps = list(segmenter.gaps)
    segmenter.gaps.clear()
    counters = {
        **segmenter.snapshot(),
        "absolute_repaired": guard.absolute_repaired,
        "timestamp_reanchors": guard.reanchors,
    }
    held = segmenter.held_frames + guard.held_frames
    return BatchResult(finished, rejected, counters, held, gaps)
