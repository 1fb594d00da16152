"""Restoring scopes' overrides to a target state (the kernel's ScopeRestorer, over PreferenceWriter)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import asyncpg

from prefd_server.kernel.model import JsonValue, Scope
from prefd_server.kernel.restore import RestoreRequest, ScopeRestored
from prefd_server.preferences import store as preference_sql
from prefd_server.preferences.model import KeyWrite, WriteResult
from prefd_server.preferences.writes import PreferenceWriter


class PreferenceRestorer:
    """Rollback of preference overrides: the writes that reach the target, through the writer's checks."""

    def __init__(self, writer: PreferenceWriter) -> None:
        self._writer = writer

    async def preview(self, request: RestoreRequest) -> tuple[list[ScopeRestored], str]:
        return await self._restore(request, "", dry_run=True)

    async def apply(self, request: RestoreRequest, expected_token: str) -> list[ScopeRestored]:
        restored, _ = await self._restore(request, expected_token, dry_run=False)
        return restored

    async def _restore(
        self, request: RestoreRequest, expected_token: str, dry_run: bool
    ) -> tuple[list[ScopeRestored], str]:
        async def plan(conn: asyncpg.Connection, ordered: Sequence[Scope]) -> dict[Scope, list[KeyWrite]]:
            planned = {}
            for scope in ordered:
                wanted = await request.target(conn, scope)
                current = await preference_sql.current_versions(conn, scope)
                planned[scope] = writes_back(wanted, current, request.keys)
            return planned

        results, token = await self._writer.rollback(
            request.scopes,
            plan,
            request.call,
            request.reason,
            dry_run=dry_run,
            expected_token=expected_token,
            org_id=request.org_id,
            rollback_of=request.rollback_of,
        )
        return [_restored(scope, result) for scope, result in zip(request.scopes, results, strict=True)], token


def writes_back(
    wanted: Mapping[str, JsonValue | None], current: Mapping[str, tuple[JsonValue | None, int]], keys: Sequence[str]
) -> list[KeyWrite]:
    """The writes that make the current overrides equal the wanted ones (for `keys`, or all)."""
    live = {key for key, (value, _version) in current.items() if value is not None}
    candidates = sorted(keys) if keys else sorted(live | {k for k, v in wanted.items() if v is not None})
    writes = []
    for key in candidates:
        target = wanted.get(key)
        now = current.get(key, (None, 0))[0]
        if target != now or type(target) is not type(now):
            writes.append(KeyWrite(key, target))
    return writes


def _restored(scope: Scope, result: WriteResult) -> ScopeRestored:
    return ScopeRestored(
        scope=scope,
        changes=result.changes,
        effective=result.effective,
    )
