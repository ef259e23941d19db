"""Which bot an unbound ingest token writes for: the first bot it wrote for, recorded in the
store with a conditional create, so every task and worker agrees on it.

A binding is `_bindings/<binding>.json` (`{"bot_id": ...}`) beside the recordings: no bot id
starts with `_`, so it is never a recording's folder, and `<binding>` is hex derived from
the token's signature (`tokens.Grant.binding`), never the token.
"""

from __future__ import annotations

from collections import OrderedDict

import orjson
import structlog

from archiver.errors import InvalidIdError, ObjectConflictError, StoreError
from archiver.layout import safe_id
from archiver.store.spool import Spool

log = structlog.get_logger(__name__)

BINDINGS_PREFIX = "_bindings"
_KNOWN_MAX = 10_000
"""Bindings remembered by this process (each a few dozen bytes): every bot of a long day."""


class TokenBindings:
    """The process's view of token bindings; the store's is the one that counts."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.known: OrderedDict[str, str] = OrderedDict()

    async def bot_of(self, binding: str, bot_id: str) -> str:
        """The bot the token named by `binding` writes for: `bot_id`, when this is the first
        bot it writes for anywhere. Raise `StoreError` when the store cannot say."""
        bound = self.known.get(binding)
        if bound is None:
            bound = await self._bind(binding, bot_id)
            self.known[binding] = bound
            while len(self.known) > _KNOWN_MAX:
                self.known.popitem(last=False)
        return bound

    async def _bind(self, binding: str, bot_id: str) -> str:
        key = f"{BINDINGS_PREFIX}/{safe_id('binding', binding)}.json"
        try:
            await self.spool.put(
                key, orjson.dumps({"bot_id": bot_id}), "application/json", replaces=""
            )
        except ObjectConflictError:
            fetched = await self.spool.fetch(key)
            if fetched is None:
                raise StoreError(key, "binding refused, then not found") from None
            try:
                bound = safe_id("bot_id", orjson.loads(fetched[0])["bot_id"])
            except (orjson.JSONDecodeError, KeyError, TypeError, InvalidIdError) as exc:
                raise StoreError(key, "binding unreadable") from exc
            return bound
        log.info("token_bound", binding=binding[:8], bot=bot_id)
        return bot_id
