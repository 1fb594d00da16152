"""The AI configuration domain's part in a user's export and erasure (a kernel PrivacyParticipant)."""

from __future__ import annotations

import asyncio

import asyncpg

from prefd_server.aiconfig import privacy_store
from prefd_server.aiconfig import store as ai_sql
from prefd_server.aiconfig.usage import user_counters_prefix
from prefd_server.kernel.model import Scope, ScopeKind, Subject
from prefd_server.kernel.privacy import ErasedRows, ExportPart
from prefd_server.kernel.redis import RedisLayers


class AIConfigPrivacy:
    """Exports a user's AI configs (keys masked) and usage; erases their configs, usage totals and
    budget counters, and pseudonymises their usage ledger rows."""

    name = "aiconfig"

    def __init__(self, redis: RedisLayers | None) -> None:
        self._redis = redis
        self._cleanups: set[asyncio.Task[None]] = set()

    async def export(self, conn: asyncpg.Connection, subject: Subject) -> ExportPart:
        scope = Scope(ScopeKind.USER, subject.user_id)
        configs = (await ai_sql.at_scopes(conn, [scope]))[scope]
        return ExportPart(
            sections={
                "ai_configs": [{"id": c.id, "version": c.version, **c.audit_document()} for c in configs],
                "usage": await privacy_store.user_usage(conn, subject.user_id),
            }
        )

    async def erase(self, conn: asyncpg.Connection, user_id: str, pseudonym: str) -> ErasedRows:
        await ai_sql.lock_scope(conn, Scope(ScopeKind.USER, user_id))
        configs = await privacy_store.delete_user_configs(conn, user_id)
        return ErasedRows({"ai_configs": configs}, await privacy_store.pseudonymise_user(conn, user_id, pseudonym))

    def after_erase(self, user_id: str, xid: int | None) -> None:
        """Drop the user's budget counters in Redis (in the background: the erasure has answered)."""
        if self._redis is not None:
            task = asyncio.ensure_future(self._redis.delete_counters(user_counters_prefix(user_id)))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
