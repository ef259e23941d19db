"""Who may connect: static tokens, and short-lived tokens signed with HMAC-SHA256.

A signed token is `v1.<key id>.<expiry>.<signature>`, all URL-safe:

- `key id`: the first 6 bytes of HMAC-SHA256(key, "archiver token key id"), base64url (8
  characters). It names the signing key without revealing it, so a verifier with several
  keys (during a rotation) checks one signature, not one per key.
- `expiry`: Unix time in whole seconds after which the token is refused.
- `signature`: HMAC-SHA256(key, "v1.<key id>.<expiry>"), base64url without padding (43
  characters).

About 70 characters in all: short enough for the websocket URL's query string, the only
place a Recall bot can carry it. The first of `ARCHIVER_TOKEN_KEYS` signs, every one
verifies; a connection is checked once, before the upgrade, and outlives its token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from archiver.errors import ConfigError, TokenError

VERSION = "v1"
MIN_KEY_LENGTH = 32
_KEY_ID_LABEL = b"archiver token key id"
_KEY_ID_BYTES = 6


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def key_id(key: bytes) -> str:
    """The public name of a signing key (derived from it, reveals nothing of it)."""
    return _b64(hmac.digest(key, _KEY_ID_LABEL, hashlib.sha256)[:_KEY_ID_BYTES])


def _signature(key: bytes, signed: str) -> str:
    return _b64(hmac.digest(key, signed.encode(), hashlib.sha256))


def create_token(key: str | bytes, ttl_s: float, now: float | None = None) -> str:
    """A token that `key` signed, valid for `ttl_s` seconds from `now` (default: the clock)."""
    key = key.encode() if isinstance(key, str) else key
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(f"a signing key needs at least {MIN_KEY_LENGTH} characters")
    if not ttl_s > 0:
        raise ConfigError("a token's lifetime must be positive")
    expiry = math.ceil((time.time() if now is None else now) + ttl_s)
    signed = f"{VERSION}.{key_id(key)}.{expiry}"
    return f"{signed}.{_signature(key, signed)}"


@dataclass(frozen=True, slots=True)
class TokenCheck:
    """The one check of an offered `token` query value, for bots and the viewer alike."""

    static: tuple[bytes, ...]
    keys: tuple[bytes, ...]
    clock: Callable[[], float] = time.time

    @classmethod
    def build(cls, static: Sequence[str], keys: Sequence[str]) -> TokenCheck:
        """From the settings' values; refuses signing keys too short to be secret."""
        encoded = tuple(k.encode() for k in keys)
        if any(len(k) < MIN_KEY_LENGTH for k in encoded):
            raise ConfigError(
                f"every ARCHIVER_TOKEN_KEYS key needs at least {MIN_KEY_LENGTH} characters "
                "(e.g. $(openssl rand -hex 32))"
            )
        return cls(tuple(t.encode() for t in static), encoded)

    def verify(self, offered: str | None) -> None:
        """Return if the token is accepted, else raise `TokenError` naming why (never
        quoting the token)."""
        if not offered:
            raise TokenError("missing")
        if self._static_match(offered):
            return
        if not offered.startswith(f"{VERSION}."):
            # Neither a static token nor one of ours: the same answer as a wrong one.
            raise TokenError("unknown_token")
        self._verify_signed(offered)

    def accepts(self, offered: str | None) -> bool:
        try:
            self.verify(offered)
        except TokenError:
            return False
        return True

    def _static_match(self, offered: str) -> bool:
        """Constant time over every static token (no early exit on a match)."""
        candidate = offered.encode()
        matched = False
        for token in self.static:
            matched |= hmac.compare_digest(candidate, token)
        return matched

    def _verify_signed(self, offered: str) -> None:
        parts = offered.split(".")
        if len(parts) != 4:
            raise TokenError("malformed")
        _, offered_key_id, expiry, signature = parts
        if not (expiry.isascii() and expiry.isdigit() and len(expiry) <= 12):
            raise TokenError("malformed")
        signed = offered.rpartition(".")[0]
        wanted = offered_key_id.encode()
        keys = [k for k in self.keys if hmac.compare_digest(key_id(k).encode(), wanted)]
        if not keys:
            raise TokenError("unknown_key")
        offered_signature = signature.encode()
        if not any(
            hmac.compare_digest(_signature(k, signed).encode(), offered_signature) for k in keys
        ):
            raise TokenError("bad_signature")
        # Only a genuine token's expiry is worth reading.
        if int(expiry) <= self.clock():
            raise TokenError("expired")
