"""The preferences domain's part in a user's export and erasure (a kernel PrivacyParticipant)."""

from __future__ import annotations

import asyncpg

from prefd_server.kernel.db import lock_scope
from prefd_server.kernel.model import Scope, ScopeKind, Subject
from prefd_server.kernel.privacy import ErasedRows, ExportPart
from prefd_server.preferences import definitions_store as definition_sql
from prefd_server.preferences import privacy_store
from prefd_server.preferences import store as preference_sql
from prefd_server.preferences.resolve import resolve

# A preference whose key contains one of these is the user's consent to something.
CONSENT_MARKERS = ("consent",)


class PreferencePrivacy:
    """Exports a user's overrides and effective values (consent among them); erases their overrides."""

    name = "preferences"

    async def export(self, conn: asyncpg.Connection, subject: Subject) -> ExportPart:
        layers = subject.layers()
        stored = await preference_sql.overrides(conn, [scope for _, scope in layers])
        own = stored[Scope(ScopeKind.USER, subject.user_id)]
        definitions = await definition_sql.all_definitions(conn)
        values = resolve(definitions, [(layer, scope, stored[scope]) for layer, scope in layers])
        effective = {v.key: v.value for v in values}
        return ExportPart(
            sections={
                "overrides": {
                    key: {"value": v.value, "version": v.version, "updated_at": v.updated_at.isoformat()}
                    for key, v in sorted(own.items())
                },
                "effective_preferences": effective,
            },
            consent={k: v for k, v in effective.items() if any(m in k.lower() for m in CONSENT_MARKERS)},
        )

    async def erase(self, conn: asyncpg.Connection, user_id: str, pseudonym: str) -> ErasedRows:
        await lock_scope(conn, Scope(ScopeKind.USER, user_id))
        overrides = await privacy_store.delete_user_values(conn, user_id)
        return ErasedRows({"overrides": overrides}, await privacy_store.pseudonymise_writer(conn, user_id, pseudonym))

    def after_erase(self, user_id: str, xid: int | None) -> None:
        """Nothing: the cache hears of the erasure as a local ERASURE commit."""
