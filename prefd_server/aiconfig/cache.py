"""AI configuration from cached per-scope configs, the model catalog and decrypted keys.

The scoped cache keeps each scope's configs, the catalog and prebuilt response bodies fresh by
change xid and snapshot horizon; this module adds the chain merge and the decrypted keys, which
are dropped when their config changes. PostgreSQL stays the source of truth.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import asyncpg

from prefd_server.aiconfig import store as ai_sql
from prefd_server.aiconfig.model import AIConfigRecord, ChainLayer, EffectiveAIConfig, ModelInfo, merge
from prefd_server.aiconfig.secretbox import SecretBox, sealing_context
from prefd_server.aiconfig.writes import merged_chain
from prefd_server.kernel.bounded_cache import CacheBudget, approximate_size
from prefd_server.kernel.db import translated_errors
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import ChangeKind, Scope, Subject
from prefd_server.kernel.scoped_cache import Layer, ScopedCache

ScopeConfigs = Layer[list[AIConfigRecord]]


@dataclass(frozen=True, slots=True)
class Resolved:
    """A subject's effective configuration and what it was built from."""

    effective: EffectiveAIConfig
    scopes: tuple[Scope, ...]
    xmin: int  # the oldest snapshot horizon among its scopes
    since_tick: int
    used: Mapping[Scope, int]  # the snapshot horizon each scope was read at


class AIConfigCache:
    """Resolves subjects' AI configuration from cached scopes and catalog."""

    def __init__(self, pool: asyncpg.Pool, box: SecretBox, env: ChainLayer, budget: CacheBudget | None = None) -> None:
        self._pool = pool
        self._box = box
        self.env = env
        self._configs: ScopedCache[list[AIConfigRecord]] = ScopedCache(
            pool, ai_sql.at_scopes, name="ai_config", budget=budget, sizeof=approximate_size
        )
        self._catalog = self._configs.snapshot_value(ai_sql.models)
        self._keys: dict[str, dict[str, str]] = {}  # config id -> slot -> plaintext

    # --- invalidation ------------------------------------------------------------------

    def on_changes(self, events: Sequence[ChangeEvent]) -> None:
        """Feed listener: forget what AI config and catalog changes make stale."""
        for event in events:
            if event.kind == ChangeKind.ERASURE:  # names only a pseudonym: forget every key
                self._keys.clear()
            elif event.kind == ChangeKind.AI_CONFIG:
                self._keys.pop(event.key.removeprefix("ai_config/"), None)
        self._configs.on_changes(events, ChangeKind.AI_CONFIG, {ChangeKind.AI_MODEL: self._catalog})

    def on_local_commit(self, scope: Scope, xid: int) -> None:
        """A write of this process committed: its own reads see it at once."""
        self._configs.forget(scope, xid)

    def on_local_catalog_commit(self, xid: int) -> None:
        """A model catalog write of this process committed."""
        self._catalog.forget(xid)

    def changed_since(self, scopes: Iterable[Scope], tick: int) -> bool:
        """Whether any of `scopes` (or the catalog) was invalidated after `tick`."""
        return self._configs.changed_since(scopes, tick)

    # --- responses ---------------------------------------------------------------------

    def response(self, key: Hashable) -> bytes | None:
        """A prebuilt response body, if one is cached for `key` (kept whole: always bytes)."""
        kept = self._configs.response(key)
        assert kept is None or isinstance(kept, bytes)
        return kept

    def store_response(self, key: Hashable, resolved: Resolved, body: bytes) -> None:
        """Keep a body unless a scope it was built from changed, or was read anew, while it was built."""
        self._configs.store_response(key, resolved.used, resolved.since_tick, body)

    # --- reads -------------------------------------------------------------------------

    async def catalog(self) -> dict[str, ModelInfo]:
        """Every model of the catalog, by name."""
        current = self._catalog.value
        return current if current is not None else await self._catalog.get()

    async def scope_configs(self, scopes: Sequence[Scope]) -> dict[Scope, ScopeConfigs]:
        """Each scope's configs: from memory, else one snapshot for all the missing ones."""
        return await self._configs.layers(scopes)

    async def resolve(self, subject: Subject) -> Resolved:
        """The subject's effective configuration: defaults <- env <- GLOBAL <- ORG <- USER."""
        since = self._configs.tick
        scopes = tuple(scope for _, scope in subject.layers())
        configs = await self._configs.layers(scopes)
        catalog = await self.catalog()
        layers = merged_chain(self.env, {s: c.value for s, c in configs.items()}, scopes)
        used = {s: c.xmin for s, c in configs.items()}
        return Resolved(merge(layers, catalog), scopes, min(used.values()), since, used)

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
        since = self._configs.tick
        async with translated_errors(), self._pool.acquire() as conn:
            sealed = await ai_sql.sealed_keys(conn, config_id)
        opened = {slot: self._box.open(s, sealing_context(config_id)) for slot, s in sealed.items()}
        if self._configs.tick == since:  # no config changed meanwhile: these cannot be a rotated-away pair
            self._keys[config_id] = opened
        return opened
