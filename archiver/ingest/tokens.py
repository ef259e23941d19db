"""Who may connect, and to what: static tokens, and short-lived scoped tokens signed with
HMAC-SHA256.

A signed token is `v2.<key id>.<expiry>.<scope>.<signature>`, all URL-safe:

- `key id`: the first 6 bytes of HMAC-SHA256(key, "archiver token key id"), base64url (8
  characters). It names the signing key without revealing it, so a verifier with several
  keys (during a rotation) checks one signature, not one per key.
- `expiry`: Unix time in whole seconds after which the token is refused.
- `scope`: `b~<bot id>` (a bot's ingest: writes for that bot only), `u` (a bot's ingest,
  bound to the first bot id it writes for, durably: `archiver.ingest.bindings`) or
  `v~<bot id>~<recording id>` (the viewer of that one recording, and nothing else).
- `signature`: HMAC-SHA256(key, everything before it), base64url without padding (43
  characters).

About 110 characters with a UUID bot id: short enough for the websocket URL's query
string, the only place a Recall bot can carry it. A `v1.<key id>.<expiry>.<signature>`
token (before scopes) is an unbound ingest token. The first of `ARCHIVER_TOKEN_KEYS`
signs, every one verifies; a connection is checked once, before the upgrade, and outlives
its token. Static tokens carry no scope: they are for local use.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from archiver.errors import ConfigError, InvalidIdError, TokenError
from archiver.layout import safe_id
from archiver.values import Grant

VERSION = "v2"
_UNSCOPED_VERSION = "v1"
MIN_KEY_LENGTH = 32
_SCOPE_SEPARATOR = "~"
_KEY_ID_LABEL = b"archiver token key id"
_KEY_ID_BYTES = 6


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def key_id(key: bytes) -> str:
    """The public name of a signing key (derived from it, reveals nothing of it)."""
    return _b64(hmac.digest(key, _KEY_ID_LABEL, hashlib.sha256)[:_KEY_ID_BYTES])


def _signature(key: bytes, signed: str) -> str:
    return _b64(hmac.digest(key, signed.encode(), hashlib.sha256))


def _scope(grant: Grant) -> str:
    """The scope part of a signed token that allows what `grant` says."""
    if grant.kind == "view":
        return _SCOPE_SEPARATOR.join(("v", str(grant.bot_id), str(grant.recording_id)))
    if grant.kind == "ingest" and grant.bot_id is not None:
        return f"b{_SCOPE_SEPARATOR}{grant.bot_id}"
    return "u"


def ingest_grant(bot_id: str | None = None) -> Grant:
    """A bot's ingest, for `bot_id` only (None: for the first bot it writes for)."""
    return Grant("ingest", None if bot_id is None else safe_id("bot", bot_id))


def view_grant(bot_id: str, recording_id: str) -> Grant:
    """The viewer of one recording."""
    return Grant("view", safe_id("bot", bot_id), safe_id("recording", recording_id))


def create_token(
    key: str | bytes,
    ttl_s: float,
    now: float | None = None,
    grant: Grant | None = None,
    max_ttl_s: float | None = None,
) -> str:
    """A token that `key` signed, valid for `ttl_s` seconds from `now` (default: the clock),
    allowing what `grant` says (default: one bot's ingest, bound on first use); a lifetime
    beyond `max_ttl_s` (None: no limit) is refused."""
    key = key.encode() if isinstance(key, str) else key
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(f"a signing key needs at least {MIN_KEY_LENGTH} characters")
    if not ttl_s > 0:
        raise ConfigError("a token's lifetime must be positive")
    if max_ttl_s is not None and not ttl_s <= max_ttl_s:
        raise ConfigError(
            f"a token's lifetime of {ttl_s:g} s is longer than the longest allowed, "
            f"{max_ttl_s:g} s (ARCHIVER_TOKEN_MAX_TTL_S)"
        )
    expiry = math.ceil((time.time() if now is None else now) + ttl_s)
    scope = _scope(grant or ingest_grant())
    signed = f"{VERSION}.{key_id(key)}.{expiry}.{scope}"
    return f"{signed}.{_signature(key, signed)}"


def _parse_scope(scope: str, signature: str, expiry: float) -> Grant:
    parts = scope.split(_SCOPE_SEPARATOR)
    try:
        if parts == ["u"]:
            binding = hashlib.sha256(signature.encode()).hexdigest()[:32]
            return Grant("ingest", binding=binding, expiry=expiry)
        if len(parts) == 2 and parts[0] == "b":
            return Grant("ingest", safe_id("bot", parts[1]), expiry=expiry)
        if len(parts) == 3 and parts[0] == "v":
            bot, recording = safe_id("bot", parts[1]), safe_id("recording", parts[2])
            return Grant("view", bot, recording, expiry=expiry)
    except InvalidIdError:
        pass
    raise TokenError("malformed")


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

    def verify(self, offered: str | None) -> Grant:
        """What the token allows, if it is accepted; else raise `TokenError` naming why
        (never quoting the token)."""
        if not offered:
            raise TokenError("missing")
        if self._static_match(offered):
            return Grant("static")
        if not offered.startswith((f"{VERSION}.", f"{_UNSCOPED_VERSION}.")):
            # Neither a static token nor one of ours: the same answer as a wrong one.
            raise TokenError("unknown_token")
        return self._verify_signed(offered)

    def grant(self, offered: str | None) -> Grant | None:
        """What the token allows, or None when it is refused."""
        try:
            return self.verify(offered)
        except TokenError:
            return None

    def _static_match(self, offered: str) -> bool:
        """Constant time over every static token (no early exit on a match)."""
        candidate = offered.encode()
        matched = False
        for token in self.static:
            matched |= hmac.compare_digest(candidate, token)
        return matched

    def _verify_signed(self, offered: str) -> Grant:
        parts = offered.split(".")
        if len(parts) != (5 if parts[0] == VERSION else 4):
            raise TokenError("malformed")
        offered_key_id, expiry, signature = parts[1], parts[2], parts[-1]
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
        # Only a genuine token's expiry and scope are worth reading.
        if int(expiry) <= self.clock():
            raise TokenError("expired")
        scope = parts[3] if parts[0] == VERSION else "u"
        return _parse_scope(scope, signature, float(expiry))
