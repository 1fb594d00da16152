"""In-process cache of AI configs per scope, the model catalog, decrypted keys and prebuilt responses.

Kept fresh the way EffectiveCache is: the feed reader (and this process's commits) record each
scope's newest change; a scope read before that change is never cached, and every response built
from a scope is dropped when the scope changes. PostgreSQL stays the source of truth.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import asyncpg

from prefd_server.aiconfig import store as ai_sql
from prefd_server.aiconfig.model import AIConfigRecord, ChainLayer, EffectiveAIConfig, ModelInfo, merge
from prefd_server.aiconfig.secretbox import SecretBox, sealing_context
from prefd_server.aiconfig.writes import merged_chain
from prefd_server.kernel.db import snapshot, translated_errors
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import ChangeKind, Scope, Subject
from prefd_server.kernel.response_cache import ResponseCache

CHANGE_MEMORY_S = 120.0
MAX_SCOPES = 100_000


@dataclass(frozen=True, slots=True)
class ScopeConfigs:
    """Every config of one scope as of a snapshot whose horizon was `xmin`."""

    records: list[AIConfigRecord]
    xmin: int


@dataclass(frozen=True, slots=True)
class Resolved:
    """A subject's effective configuration and what it was built from."""

    effective: EffectiveAIConfig
    scopes: tuple[Scope, ...]
    xmin: int  # the oldest snapshot horizon among its scopes
    since_tick: int


class AIConfigCache:
    """Resolves subjects' AI configuration from cached scopes and catalog."""

    def __init__(self, pool: asyncpg.Pool, box: SecretBox, env: ChainLayer) -> None:
        self._pool = pool
        self._box = box
        self.env = env
        self._scopes: dict[Scope, ScopeConfigs] = {}
        self._catalog: dict[str, ModelInfo] | None = None
        self._catalog_changed_xid = 0
        self._catalog_tick = 0
        self._changed: dict[Scope, tuple[int, int, float]] = {}  # scope -> (xid, tick, monotonic)
        self._tick = 0
        self._keys: dict[str, dict[str, str]] = {}  # config id -> slot -> plaintext
        self._responses = ResponseCache()

    # --- invalidation ------------------------------------------------------------------

    def on_changes(self, events: Sequence[ChangeEvent]) -> None:
        """Feed listener: forget what AI config and catalog changes make stale."""
        for event in events:
            if event.kind == ChangeKind.ERASURE:  # names only a pseudonym: forget every scope
                self._keys.clear()
                for scope in list(self._scopes):
                    self._forget_scope(scope, event.xid)
                self._drop_responses(None)
            elif event.kind == ChangeKind.AI_CONFIG:
                self._keys.pop(event.key.removeprefix("ai_config/"), None)
                self._forget_scope(event.scope, event.xid)
            elif event.kind == ChangeKind.AI_MODEL:
                self.on_local_catalog_commit(event.xid)
        if len(self._changed) > MAX_SCOPES:
            cutoff = time.monotonic() - CHANGE_MEMORY_S
            self._changed = {s: v for s, v in self._changed.items() if v[2] >= cutoff}

    def on_local_commit(self, scope: Scope, xid: int) -> None:
        """A write of this process committed: its own reads see it at once."""
        self._forget_scope(scope, xid)

    def on_local_catalog_commit(self, xid: int) -> None:
        self._tick += 1
        self._catalog = None
        self._catalog_changed_xid = max(self._catalog_changed_xid, xid)
        self._catalog_tick = self._tick
        self._drop_responses(None)

    def _forget_scope(self, scope: Scope, xid: int) -> None:
        self._tick += 1
        previous = self._changed.get(scope)
        self._changed[scope] = (max(xid, previous[0] if previous else 0), self._tick, time.monotonic())
        self._scopes.pop(scope, None)
        self._drop_responses(scope)

    def _drop_responses(self, scope: Scope | None) -> None:
        """Drop responses built from `scope` (every response for GLOBAL or None)."""
        self._responses.drop(scope)

    def _fresh(self, scope: Scope, xmin: int) -> bool:
        changed = self._changed.get(scope)
        return changed is None or xmin > changed[0]

    def changed_since(self, scopes: Sequence[Scope], tick: int) -> bool:
        """Whether any of `scopes` (or the catalog) was invalidated after `tick`."""
        if self._catalog_tick > tick:
            return True
        for scope in scopes:
            changed = self._changed.get(scope)
            if changed is not None and changed[1] > tick:
                return True
        return False

    # --- responses ---------------------------------------------------------------------

    def response(self, key: Hashable) -> bytes | None:
        return self._responses.get(key)

    def store_response(self, key: Hashable, resolved: Resolved, body: bytes) -> None:
        """Keep a body unless a scope it was built from changed while it was built."""
        if self.changed_since(resolved.scopes, resolved.since_tick):
            return
        self._responses.put(key, body, resolved.scopes)

    # --- reads -------------------------------------------------------------------------

    async def catalog(self) -> dict[str, ModelInfo]:
        if self._catalog is not None:
            return self._catalog
        async with snapshot(self._pool) as snap:
            xmin = snap.xmin
            loaded = await ai_sql.models(snap.conn)
        if xmin > self._catalog_changed_xid:
            self._catalog = loaded
        return loaded

    async def scope_configs(self, scopes: Sequence[Scope]) -> dict[Scope, ScopeConfigs]:
        """Each scope's configs: from memory, else one snapshot for all the missing ones."""
        found = {s: self._scopes[s] for s in scopes if s in self._scopes}
        missing = [s for s in scopes if s not in found]
        if not missing:
            return found
        async with snapshot(self._pool) as snap:
            xmin = snap.xmin
            loaded = await ai_sql.at_scopes(snap.conn, missing)
        for scope in missing:
            configs = ScopeConfigs(loaded[scope], xmin)
            found[scope] = configs
            # A newer read of the scope than any response was built from: those must not be served after it.
            self._drop_responses(scope)
            if self._fresh(scope, xmin) and len(self._scopes) < MAX_SCOPES:
                self._scopes[scope] = configs
        return found

    async def resolve(self, subject: Subject) -> Resolved:
        """The subject's effective configuration: defaults <- env <- GLOBAL <- ORG <- USER."""
        since = self._tick
        scopes = tuple(scope for _, scope in subject.layers())
        configs = await self.scope_configs(scopes)
        catalog = await self.catalog()
        layers = merged_chain(self.env, {s: c.records for s, c in configs.items()}, scopes)
        return Resolved(merge(layers, catalog), scopes, min(c.xmin for c in configs.values()), since)

    async def plaintext_keys(self, effective: EffectiveAIConfig) -> dict[str, str]:
        """The effective key set in clear, by slot (for callers holding ai:secrets:read)."""
        source = effective.key_source
        if source is None or effective.keys is None:
            return {}
        if not source.config_id:
            return {"primary": effective.keys.primary or ""}
        return await self.config_keys(source.config_id)

    async def config_keys(self, config_id: str) -> dict[str, str]:
        """One config's keys in clear, by slot."""
        known = self._keys.get(config_id)
        if known is not None:
            return known
        since = self._tick
        async with translated_errors(), self._pool.acquire() as conn:
            sealed = await ai_sql.sealed_keys(conn, config_id)
        opened = {slot: self._box.open(s, sealing_context(config_id)) for slot, s in sealed.items()}
        if self._tick == since:  # no config changed meanwhile: these cannot be a rotated-away pair
            self._keys[config_id] = opened
        return opened
