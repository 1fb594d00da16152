"""Transactions that change definitions and overrides: validate, compare-and-set, write with change rows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from prefd_server.kernel import feed_store as feed_sql
from prefd_server.kernel.commits import LocalCommits
from prefd_server.kernel.db import lock_scope, translated_errors
from prefd_server.kernel.errors import (
    DefinitionExists,
    DefinitionInUse,
    DefinitionNotFound,
    PolicyViolation,
    StaleRollback,
    ValidationFailed,
    VersionConflict,
)
from prefd_server.kernel.model import (
    CallInfo,
    ChangeKind,
    FieldViolation,
    KeyChange,
    Layer,
    ResolvedValue,
    Scope,
    ScopeKind,
    Subject,
)
from prefd_server.kernel.value_checks import ValueChecks
from prefd_server.preferences import definitions_store as definition_sql
from prefd_server.preferences import store as preference_sql
from prefd_server.preferences.model import CrossFieldRule, Definition, KeyWrite, ScopeWrite, WriteResult
from prefd_server.preferences.policy import from_json as policy_from_json
from prefd_server.preferences.policy import is_policy, own_value, refusal
from prefd_server.preferences.resolve import resolve
from prefd_server.preferences.rollout import is_rollout
from prefd_server.preferences.rules import checked_value_problems, coerce, rule_violations, value_problems

# Given a connection and the scopes, the writes each scope needs (read inside the transaction).
RollbackPlan = Callable[[asyncpg.Connection, Sequence[Scope]], Awaitable[dict[Scope, list[KeyWrite]]]]


class _Rollback(Exception):
    """Raised inside a transaction to end a dry run without writing."""


@dataclass(frozen=True, slots=True)
class _Staged:
    """Validated writes at one scope: the definitions of their keys and the changes they make."""

    scope: Scope
    # The org a USER scope resolves through ("" for none, and for other scopes).
    org_id: str
    # Where the writes sit in the request, for field violations ("writes", "scopes[1].changes").
    field: str
    keys: tuple[str, ...]
    definitions: dict[str, Definition]
    changes: tuple[KeyChange, ...]

    def result(self, effective: Sequence[ResolvedValue], dry_run: bool) -> WriteResult:
        """The write's answer: its changes and the effective values of the keys it names."""
        written = set(self.keys)
        return WriteResult(list(self.changes), [r for r in effective if r.key in written], dry_run)


def layers_for_scope(scope: Scope, org_id: str) -> list[tuple[Layer, Scope]]:
    """The layers a value written at `scope` is resolved through (it and its parents)."""
    if scope.kind is ScopeKind.GLOBAL:
        return Subject("-").layers()[:1]
    if scope.kind is ScopeKind.ORG:
        return Subject("-", scope.id).layers()[:2]
    return Subject(scope.id, org_id).layers()


class PreferenceWriter:
    """Every write to definitions and overrides, each in one transaction with its change rows."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        rules: Sequence[CrossFieldRule],
        commits: LocalCommits | None = None,
        checks: ValueChecks | None = None,
    ) -> None:
        self._pool = pool
        self._rules = tuple(rules)
        self._commits = commits
        # Checks by key that every written value and every definition default must pass too.
        self._checks = checks

    async def write(
        self,
        command: ScopeWrite,
        call: CallInfo,
        also: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    ) -> WriteResult:
        """Set (value) or remove (None) keys at one scope, all or nothing (nothing stored on a dry run).
        `also` runs in the same transaction after the writes (not on a dry run)."""
        async with translated_errors(), self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    result, xid = await self._write_locked(conn, command, call)
                    if command.dry_run:
                        raise _Rollback
                    if also is not None:
                        await also(conn)
            except _Rollback:
                pass
        if xid is not None and not command.dry_run and self._commits is not None:
            self._commits.committed(ChangeKind.PREFERENCE, command.scope, xid)
        return result

    async def _write_locked(
        self, conn: asyncpg.Connection, command: ScopeWrite, call: CallInfo
    ) -> tuple[WriteResult, int | None]:
        scope = command.scope
        # Locks before the first write: definition keys (shared, key order), then the scope,
        # the order DeleteDefinition and UpdateDefinition take too, so writers never deadlock.
        # Advisory locks assign no xid, so the transaction's xid is assigned only once it holds
        # the scope: per-key versions then grow in the change feed's (xid, id) order.
        await definition_sql.lock_keys_shared(conn, [w.key for w in command.writes])
        written_at = await lock_scope(conn, scope)
        staged = await self._staged(conn, scope, command.writes, command.org_id, command.field)
        effective = await self._effective_after(conn, staged, [staged], call.actor, written_at)
        self._check_rules(staged, effective)
        xid = None
        if not command.dry_run:
            xid = await preference_sql.apply_changes(
                conn, scope, staged.changes, call, command.reason, org_id=staged.org_id
            )
        return staged.result(effective, command.dry_run), xid

    async def _staged(
        self, conn: asyncpg.Connection, scope: Scope, writes: Sequence[KeyWrite], org_id: str, field: str
    ) -> _Staged:
        """Validate writes at a scope whose lock (and its keys' definition locks) the caller holds,
        and work out the changes they make (nothing is written yet)."""
        keys = [w.key for w in writes]
        definitions = await definition_sql.get_many(conn, keys)
        violations = []
        for i, w in enumerate(writes):
            definition = definitions.get(w.key)
            if definition is None:
                violations.append(FieldViolation(f"{field}[{i}].key", f"unknown key {w.key!r}"))
            elif scope.kind not in definition.scopes:
                allowed = ", ".join(s.value for s in ScopeKind if s in definition.scopes)
                violations.append(
                    FieldViolation(
                        f"{field}[{i}].key", f"{w.key} cannot be overridden at {scope.kind.value} (allowed: {allowed})"
                    )
                )
            elif is_policy(w.value) and scope.kind is ScopeKind.USER:
                violations.append(FieldViolation(f"{field}[{i}].policy", "a policy is set at ORG or GLOBAL scope"))
            elif is_rollout(own_value(w.value)) and scope.kind is ScopeKind.USER:
                violations.append(FieldViolation(f"{field}[{i}].rollout", "a rollout is set at ORG or GLOBAL scope"))
            elif w.value is not None:
                where = "policy" if is_policy(w.value) else "rollout" if is_rollout(w.value) else "value"
                violations += [
                    FieldViolation(f"{field}[{i}].{where}", f"{w.key} {p}")
                    for p in checked_value_problems(definition, w.value, self._checks)
                ]
        if violations:
            raise ValidationFailed(violations)
        await self._check_policies(conn, scope, org_id, writes)

        current = await preference_sql.current_versions(conn, scope, keys)
        changes = []
        for w in writes:
            old_value, old_version = current.get(w.key, (None, 0))
            if w.expected_version is not None and w.expected_version != old_version:
                raise VersionConflict(w.key, w.expected_version, old_version)
            new_value = None if w.value is None else coerce(definitions[w.key], w.value)
            if new_value == old_value and type(new_value) is type(old_value):
                continue
            changes.append(KeyChange(w.key, old_value, new_value, old_version, old_version + 1))
        return _Staged(scope, org_id, field, tuple(keys), definitions, tuple(changes))

    async def _check_policies(
        self, conn: asyncpg.Connection, scope: Scope, org_id: str, writes: Sequence[KeyWrite]
    ) -> None:
        """PolicyViolation if a value written at `scope` breaks a policy stored at a scope above it."""
        above = [s for _, s in layers_for_scope(scope, org_id) if s != scope]
        if not above or all(w.value is None for w in writes):
            return
        stored = await preference_sql.overrides(conn, above)
        for w in writes:
            if w.value is None:
                continue
            for upper in above:
                held = stored[upper].get(w.key)
                if held is not None and is_policy(held.value):
                    rule = refusal(policy_from_json(held.value), w.value)
                    if rule is not None:
                        raise PolicyViolation(w.key, str(scope), str(upper), rule)

    def _check_rules(self, staged: _Staged, effective: Sequence[ResolvedValue]) -> None:
        """ValidationFailed if the effective values after the changes break a cross-field rule."""
        broken = rule_violations(self._rules, {r.key: r.value for r in effective}, [c.key for c in staged.changes])
        if broken:
            index = {key: i for i, key in enumerate(staged.keys)}
            raise ValidationFailed(
                [FieldViolation(f"{staged.field}[{index[key]}].value", rule.message) for rule, key in broken]
            )

    async def _effective_after(
        self,
        conn: asyncpg.Connection,
        staged: _Staged,
        pending: Sequence[_Staged],
        actor: str,
        written_at: datetime,
    ) -> list[ResolvedValue]:
        """Effective values at a staged scope of its written keys and every rule key, as if all the
        `pending` changes (this transaction's, at any scope) were stored at `written_at`."""
        rule_keys = {k for rule in self._rules for k in rule.non_decreasing} - staged.definitions.keys()
        wanted = {**staged.definitions, **await definition_sql.get_many(conn, sorted(rule_keys))}
        layers = layers_for_scope(staged.scope, staged.org_id)
        stored = await preference_sql.overrides(conn, [s for _, s in layers])
        for other in pending:
            if other.scope not in stored or not other.changes:
                continue
            overlaid = dict(stored[other.scope])
            for change in other.changes:
                if change.new_value is None:
                    overlaid.pop(change.key, None)
                else:
                    overlaid[change.key] = preference_sql.pending_value(other.scope, change, actor, written_at)
            stored[other.scope] = overlaid
        return resolve(sorted(wanted.values(), key=lambda d: d.key), [(layer, s, stored[s]) for layer, s in layers])

    async def rollback(
        self,
        scopes: Sequence[Scope],
        plan: RollbackPlan,
        call: CallInfo,
        reason: str,
        *,
        dry_run: bool,
        expected_token: str,
        org_id: str,
        rollback_of: str,
    ) -> tuple[list[WriteResult], str]:
        """Write what `plan` says each scope needs, all scopes in one transaction (or none).

        Every scope's effective values resolve through all the scopes' changes, so a USER scope
        reports its ORG scope's rolled-back values when both are in the rollback. Returns the
        results and the token of the state they were computed from; with `expected_token`,
        refuses (StaleRollback) if the state is no longer that one.
        """
        ordered = sorted(set(scopes), key=str)
        results: dict[Scope, WriteResult] = {}
        xid: int | None = None
        token = ""
        async with translated_errors(), self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    planned = await plan(conn, ordered)
                    locked = sorted({w.key for writes in planned.values() for w in writes})
                    await definition_sql.lock_keys_shared(conn, locked)
                    for scope in ordered:
                        # The same transaction time from each: the time every row written here carries.
                        written_at = await lock_scope(conn, scope)
                    planned = await plan(conn, ordered)  # again, now that nothing can move
                    extra = sorted({w.key for writes in planned.values() for w in writes} - set(locked))
                    await definition_sql.lock_keys_shared(conn, extra)
                    token = await preference_sql.state_token(conn, ordered)
                    if expected_token and expected_token != token:
                        raise StaleRollback("the scopes changed since the preview; preview again")
                    staged: dict[Scope, _Staged] = {}
                    for n, scope in enumerate(scopes):
                        if scope not in staged:
                            org = org_id if scope.kind is ScopeKind.USER else ""
                            field = f"scopes[{n}].changes"
                            staged[scope] = await self._staged(conn, scope, planned[scope], org, field)
                    pending = list(staged.values())
                    for one in pending:
                        effective = await self._effective_after(conn, one, pending, call.actor, written_at)
                        self._check_rules(one, effective)
                        results[one.scope] = one.result(effective, dry_run)
                    if dry_run:
                        raise _Rollback
                    for one in pending:
                        written = await preference_sql.apply_changes(
                            conn, one.scope, one.changes, call, reason, rollback_of, one.org_id
                        )
                        xid = written or xid
            except _Rollback:
                pass
        if xid is not None and self._commits is not None:
            for scope in ordered:
                self._commits.committed(ChangeKind.PREFERENCE, scope, xid)
        return [results[s] for s in scopes], token

    async def reset(self, scope: Scope, category: str, call: CallInfo, reason: str) -> WriteResult:
        """Remove every override at a scope, or those of one category."""
        async with translated_errors(), self._pool.acquire() as conn:
            live = await preference_sql.page(conn, scope, None, 1_000_000)
            keys = [v.key for v in live]
            if category:
                in_category = await definition_sql.get_many(conn, keys)
                keys = [k for k in keys if k in in_category and in_category[k].category == category]
        if not keys:
            return WriteResult([])
        return await self.write(ScopeWrite(scope, tuple(KeyWrite(k, None) for k in keys), reason, field="keys"), call)

    async def create_definition(self, definition: Definition, call: CallInfo) -> Definition:
        """Store a new definition; ALREADY_EXISTS if the key is taken."""
        self._check_default(definition)
        async with translated_errors(), self._pool.acquire() as conn, conn.transaction():
            stored = await definition_sql.insert(conn, definition, call, "")
            xid = await feed_sql.current_xid(conn)
        if stored is None:
            raise DefinitionExists(definition.key)
        self._definitions_committed(xid)
        return stored

    async def update_definition(
        self, definition: Definition, expected_version: int | None, call: CallInfo
    ) -> Definition:
        """Replace a definition if every stored override still satisfies it."""
        self._check_default(definition)
        async with translated_errors(), self._pool.acquire() as conn, conn.transaction():
            await definition_sql.lock_key_exclusive(conn, definition.key)
            old = await definition_sql.get(conn, definition.key, for_update=True)
            if old is None:
                raise DefinitionNotFound(definition.key)
            if expected_version is not None and expected_version != old.version:
                raise VersionConflict(definition.key, expected_version, old.version)
            misfits = []
            for stored in await preference_sql.values_of_key(conn, definition.key):
                if stored.scope.kind not in definition.scopes:
                    misfits.append(f"{stored.scope}: scope no longer allowed")
                else:
                    misfits += [f"{stored.scope}: value {p}" for p in value_problems(definition, stored.value)]
            if misfits:
                raise DefinitionInUse(
                    f"stored overrides of {definition.key} break the new definition: " + "; ".join(misfits[:10]),
                    key=definition.key,
                )
            updated = await definition_sql.update(conn, old, definition, call)
            xid = await feed_sql.current_xid(conn)
        self._definitions_committed(xid)
        return updated

    def _check_default(self, definition: Definition) -> None:
        """ValidationFailed if the checks registered for the definition's key refuse its default."""
        problems = checked_value_problems(definition, definition.default, self._checks)
        if problems:
            raise ValidationFailed([FieldViolation("definition.default_value", p) for p in problems])

    def _definitions_committed(self, xid: int) -> None:
        if self._commits is not None:
            self._commits.committed(ChangeKind.DEFINITION, xid=xid)

    async def delete_definition(self, key: str, force: bool, call: CallInfo, reason: str) -> int:
        """Delete a definition; with force, first remove its overrides (recorded). Returns how many."""
        async with translated_errors(), self._pool.acquire() as conn, conn.transaction():
            await definition_sql.lock_key_exclusive(conn, key)
            old = await definition_sql.get(conn, key, for_update=True)
            if old is None:
                raise DefinitionNotFound(key)
            scopes = sorted(await preference_sql.scopes_with_key(conn, key), key=str)
            if scopes and not force:
                raise DefinitionInUse(
                    f"{len(scopes)} override(s) of {key} exist; remove them or delete with force", key=key
                )
            for scope in scopes:
                await lock_scope(conn, scope)
                value, version = (await preference_sql.current_versions(conn, scope, [key]))[key]
                change = KeyChange(key, value, None, version, version + 1)
                await preference_sql.apply_changes(conn, scope, [change], call, reason)
            await definition_sql.delete(conn, old, call, reason)
            xid = await feed_sql.current_xid(conn)
        if self._commits is not None:
            for scope in scopes:
                self._commits.committed(ChangeKind.PREFERENCE, scope, xid)
        self._definitions_committed(xid)
        return len(scopes)


async def install_definitions(pool: asyncpg.Pool, definitions: Sequence[Definition], call: CallInfo) -> list[str]:
    """Insert the shipped definitions that do not exist yet (never overwriting an admin's edits)."""
    async with translated_errors(), pool.acquire() as conn, conn.transaction():
        added = []
        for definition in definitions:
            if await definition_sql.insert(conn, definition, call, "shipped definition") is not None:
                added.append(definition.key)
        return added
