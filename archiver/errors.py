"""Every error the service raises on purpose, split by whose fault it is.

`InputError`s are the sender's: the message is counted, logged and skipped. `StoreError`s
are the storage's: the user's bucket refused or could not be reached. Anything else is a
bug of ours.
"""

from __future__ import annotations

from typing import Any


class ArchiverError(Exception):
    """Base of the errors this package raises on purpose."""


class ConfigError(ArchiverError):
    """Raised at start-up when the settings cannot run the service."""


class InputError(ArchiverError):
    """Raised for a message the protocol does not allow; `reason` names the counter."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class InvalidIdError(InputError):
    """Raised when an id would not be safe inside an object key."""

    def __init__(self, field: str, value: object) -> None:
        super().__init__("invalid_id", f"{field}={value!r:.80}")


class MediaError(InputError):
    """Raised when a media buffer cannot be archived (bad base64, not H.264 or PNG)."""


class SegmenterFailure(MediaError):
    """Raised when a segmenter failed on a frame for a reason of ours, not the frame's: the
    frame is dropped, whatever the open segment or batch held is closed and handed back in
    `salvaged`, and the segmenter starts afresh (at the next key frame, for H.264)."""

    def __init__(self, detail: str, salvaged: list[Any]) -> None:
        super().__init__("segmenter_error", detail)
        self.salvaged = salvaged


class StoreError(ArchiverError):
    """Raised when the store did not accept an object after every retry."""

    def __init__(self, key: str, cause: str) -> None:
        super().__init__(f"storing {key} failed: {cause}")
        self.key = key
        self.cause = cause


class ObjectConflictError(StoreError):
    """Raised when a write-once key already holds different bytes: the store keeps the
    first version, nothing is overwritten."""


class DamagedObjectError(ArchiverError):
    """Raised by the read side when an object a manifest lists is missing, or its size or
    SHA-256 differs from the manifest's: the archive is not what it promised."""

    def __init__(self, key: str, cause: str) -> None:
        super().__init__(f"{key}: {cause}")
        self.key = key
        self.cause = cause


class TokenError(InputError):
    """Raised when an offered token is not accepted: missing, unknown, malformed, signed
    by no configured key, tampered with or expired (`reason`); answered with 401 before
    the websocket upgrade. The token itself is never part of it."""
