"""Transactions that change AI configs and the catalog, each with its change row (keys sealed, masked in audit)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import date

import asyncpg

from prefd_server.aiconfig import store as ai_sql
from prefd_server.aiconfig import usage_store as usage_sql
from prefd_server.aiconfig.model import (
    DEFAULT_LAYER,
    AIConfigRecord,
    APIKeySet,
    ChainLayer,
    KeyUpdate,
    ModelInfo,
    Mutation,
    Violation,
    config_layers,
    merge,
)
from prefd_server.aiconfig.secretbox import SecretBox, sealing_context
from prefd_server.aiconfig.usage import Budgets, Generation, UsageRecord
from prefd_server.kernel import feed_store as feed_sql
from prefd_server.kernel.commits import LocalCommits
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.db import translated_errors
from prefd_server.kernel.errors import AIConfigExists, AIConfigNotFound, ValidationFailed, VersionConflict
from prefd_server.kernel.feed import FeedReader
from prefd_server.kernel.model import CallInfo, ChangeKind, FieldViolation, Layer, Scope, ScopeKind
from prefd_server.kernel.tokens import TokenKey
from prefd_server.kernel.watch import WatchItem, WatchTarget, watch

LAYER_OF_SCOPE = {ScopeKind.GLOBAL: Layer.GLOBAL, ScopeKind.ORG: Layer.ORG, ScopeKind.USER: Layer.USER}


class AIConfigStore:
    """Reads named configs; creates, changes and deletes them, validating the chain each lands in."""

    def __init__(self, pool: asyncpg.Pool, box: SecretBox, env: ChainLayer, commits: LocalCommits | None) -> None:
        self._pool = pool
        self._box = box
        self._env = env
        self._commits = commits

    async def get(self, config_id: str) -> AIConfigRecord:
        """One config; NOT_FOUND if it does not exist."""
        async with translated_errors(), self._pool.acquire() as conn:
            record = await ai_sql.get(conn, config_id)
        if record is None:
            raise AIConfigNotFound(config_id)
        return record

    async def page(self, scope: Scope, after: tuple[int, str] | None, limit: int) -> list[AIConfigRecord]:
        async with translated_errors(), self._pool.acquire() as conn:
            return await ai_sql.page(conn, scope, after, limit)

    async def create(
        self,
        draft: AIConfigRecord,
        keys: KeyUpdate | None,
        call: CallInfo,
        reason: str,
        chain_org: str,
    ) -> AIConfigRecord:
        """Store a new config; ALREADY_EXISTS if its name is taken at its scope."""
        record = replace(draft, id=str(uuid.uuid4()), version=1)
        stored = await self._write(record.scope, None, None, lambda _old: (record, keys), call, reason, chain_org)
        assert stored is not None
        return stored

    async def change(
        self,
        config_id: str,
        expected_version: int | None,
        mutate: Mutation,
        call: CallInfo,
        reason: str,
        chain_org: Callable[[Scope], str],
        authorize: Callable[[Scope], None],
    ) -> AIConfigRecord | None:
        """Apply `mutate` to a stored config (None from it deletes). `authorize` sees the scope first;
        `chain_org` names the org whose configs a USER config is validated under."""
        async with translated_errors(), self._pool.acquire() as conn:
            scope = await ai_sql.scope_of(conn, config_id)
        if scope is None:
            raise AIConfigNotFound(config_id)
        authorize(scope)
        return await self._write(scope, config_id, expected_version, mutate, call, reason, chain_org(scope))

    async def _write(
        self,
        scope: Scope,
        config_id: str | None,
        expected_version: int | None,
        mutate: Mutation,
        call: CallInfo,
        reason: str,
        chain_org: str,
    ) -> AIConfigRecord | None:
        async with translated_errors(), self._pool.acquire() as conn:
            async with conn.transaction():
                await ai_sql.lock_scope(conn, scope)
                old = None
                if config_id is not None:
                    old = await ai_sql.get(conn, config_id)
                    if old is None:
                        raise AIConfigNotFound(config_id)
                    if expected_version is not None and expected_version != old.version:
                        raise VersionConflict(f"ai_config/{config_id}", expected_version, old.version)
                new, keys = mutate(old)
                if new is not None and keys is not None:
                    new = self._with_keys(new, old, keys)
                if new is not None:
                    new = replace(new, version=old.version + 1 if old else 1)
                    if (old is None or old.name != new.name) and await ai_sql.name_taken(
                        conn, scope, new.name, config_id
                    ):
                        raise AIConfigExists(new.name, str(scope), "config.name")
                await self._check_chain(conn, scope, old, new, chain_org)
                xid = await self._store(conn, scope, old, new, keys, call, reason)
                stored = await ai_sql.get(conn, new.id) if new is not None else None
        if self._commits is not None:
            self._commits.committed(ChangeKind.AI_CONFIG, scope, xid)
        return stored

    def _with_keys(self, new: AIConfigRecord, old: AIConfigRecord | None, keys: KeyUpdate) -> AIConfigRecord:
        """The record's key set after the update (last 4 characters only; the plaintext is sealed on store)."""
        current = old.keys if old is not None else None
        version = current.key_version if current else 0
        primary = keys.slots.get("primary")
        secondary = keys.slots.get("secondary")
        if keys.rotate:
            if current is None or primary is None:
                raise ValidationFailed([FieldViolation("id", "the config has no primary key to rotate")])
            return replace(new, keys=APIKeySet(version + 1, primary[-4:], current.primary_last4))
        primary_last4 = _last4_after(primary, current.primary_last4 if current else "")
        secondary_last4 = _last4_after(secondary, current.secondary_last4 if current else "")
        if not primary_last4:
            if secondary_last4:
                raise ValidationFailed(
                    [FieldViolation("config.configuration.api_keys.primary", "a secondary key needs a primary key")]
                )
            return replace(new, keys=None)
        if keys.new_primary:
            version += 1
        return replace(new, keys=APIKeySet(max(version, 1), primary_last4, secondary_last4))

    async def _check_chain(
        self,
        conn: asyncpg.Connection,
        scope: Scope,
        old: AIConfigRecord | None,
        new: AIConfigRecord | None,
        chain_org: str,
    ) -> None:
        """Refuse a write that makes the chain it lands in break a rule it did not break before."""
        if new is None or not new.active:
            return
        catalog = await ai_sql.models(conn)
        scopes = [Scope(ScopeKind.GLOBAL)]
        if scope.kind is ScopeKind.ORG:
            scopes.append(scope)
        elif scope.kind is ScopeKind.USER:
            if chain_org:
                scopes.append(Scope(ScopeKind.ORG, chain_org))
            scopes.append(scope)
        stored = await ai_sql.at_scopes(conn, scopes)

        def chain(mine: AIConfigRecord | None) -> list[ChainLayer]:
            layers = [DEFAULT_LAYER, self._env]
            for s in scopes:
                records = [r for r in stored[s] if r.id != new.id]
                if s == scope and mine is not None:
                    records.append(mine)
                layers += config_layers(records, LAYER_OF_SCOPE[s.kind])
            return layers

        before = {v.rule for v in merge(chain(old), catalog).violations}
        after = [v for v in merge(chain(new), catalog).violations if v.rule not in before]
        if after:
            raise ValidationFailed([_request_violation(v) for v in after])

    async def _store(
        self,
        conn: asyncpg.Connection,
        scope: Scope,
        old: AIConfigRecord | None,
        new: AIConfigRecord | None,
        keys: KeyUpdate | None,
        call: CallInfo,
        reason: str,
    ) -> int:
        if new is None:
            assert old is not None
            await ai_sql.delete(conn, old.id)
            version = old.version + 1
        else:
            await ai_sql.upsert(conn, new, call.actor)
            version = new.version
            if keys is not None and keys.rotate:
                await ai_sql.demote_primary(conn, new.id)
            for slot, plaintext in keys.slots.items() if keys else ():
                sealed = self._box.seal(plaintext, sealing_context(new.id)) if plaintext else None
                await ai_sql.store_key(conn, new.id, slot, sealed, plaintext[-4:])
        config_id = new.id if new is not None else old.id  # type: ignore[union-attr]
        return await feed_sql.append_change(
            conn,
            ChangeKind.AI_CONFIG,
            scope,
            f"ai_config/{config_id}",
            old.audit_document() if old else None,
            new.audit_document() if new else None,
            version,
            call,
            reason,
        )

    async def record_usage(
        self, generation: Generation, budgets: Budgets, call: CallInfo
    ) -> tuple[UsageRecord, int | None]:
        """Append a usage ledger row (see usage_store.record): the record and the xid of its crossings."""
        return await usage_sql.record(self._pool, generation, budgets, call)

    async def usage_totals(self, user_id: str, starts: dict[str, date]) -> dict[str, int]:
        """The user's spend (nano-USD) in each of the given periods, from the ledger."""
        return await usage_sql.totals(self._pool, user_id, starts)

    def watch(
        self,
        feed: FeedReader,
        target: WatchTarget,
        start: FeedCursor | None,
        progress_interval_s: float,
        tokens: TokenKey,
        kinds: frozenset[ChangeKind],
    ) -> AsyncIterator[WatchItem]:
        """A watch session on `target`: its history from this store's database, then the live feed."""
        return watch(feed, self._pool, target, start, progress_interval_s, tokens, kinds=kinds)

    async def update_model(self, model: ModelInfo, call: CallInfo, reason: str) -> ModelInfo:
        """Create or replace a catalog model, with its change row."""
        async with translated_errors(), self._pool.acquire() as conn:
            async with conn.transaction():
                await ai_sql.lock_model(conn, model.model)
                old = (await ai_sql.models(conn)).get(model.model)
                stored = await ai_sql.upsert_model(conn, model, call.actor)
                xid = await feed_sql.append_change(
                    conn,
                    ChangeKind.AI_MODEL,
                    Scope(ScopeKind.GLOBAL),
                    f"ai_model/{model.model}",
                    ai_sql.model_document(old) if old else None,
                    ai_sql.model_document(stored),
                    stored.version,
                    call,
                    reason,
                )
        if self._commits is not None:
            self._commits.committed(ChangeKind.AI_MODEL, xid=xid)
        return stored


def _last4_after(update: str | None, stored_last4: str) -> str:
    """A slot's last 4 characters after an update: the new key's, none ("" empties it), or unchanged (None)."""
    if update is None:
        return stored_last4
    return update[-4:]


def _request_violation(violation: Violation) -> FieldViolation:
    return FieldViolation(f"config.configuration.{violation.path}", violation.description)


async def reseal_all(pool: asyncpg.Pool, box: SecretBox) -> tuple[int, int]:
    """Re-encrypt every stored API key under the current master key: (resealed, already current)."""
    resealed = current = 0
    async with translated_errors(), pool.acquire() as conn, conn.transaction():
        for config_id, slot, sealed in await ai_sql.all_sealed_keys(conn):
            if sealed.key_id == box.current_id:
                current += 1
                continue
            context = sealing_context(config_id)
            plaintext = box.open(sealed, context)
            await ai_sql.store_key(conn, config_id, slot, box.seal(plaintext, context), plaintext[-4:])
            resealed += 1
    return resealed, current


def merged_chain(
    env: ChainLayer, records: Mapping[Scope, Sequence[AIConfigRecord]], scopes: Sequence[Scope]
) -> list[ChainLayer]:
    """The chain for a subject whose scopes (GLOBAL, ORG?, USER) hold `records`."""
    layers = [DEFAULT_LAYER, env]
    for scope in scopes:
        layers += config_layers(records.get(scope, ()), LAYER_OF_SCOPE[scope.kind])
    return layers
