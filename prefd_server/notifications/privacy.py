"""The consent ledger's part in a user's export and erasure (a kernel PrivacyParticipant)."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from prefd_server.kernel.model import Subject
from prefd_server.kernel.privacy import ErasedRows, ExportPart
from prefd_server.notifications import consent_store, privacy_store
from prefd_server.notifications.model import ConsentStatus


class ConsentPrivacy:
    """Exports a user's whole consent ledger and the purposes granted now; erasure pseudonymises it.

    Consent evidence is retained, pseudonymised, not deleted: erasure puts the pseudonym where the
    ledger records the user (as subject or as actor) and deletes nothing. The entries' change rows
    are pseudonymised with the rest of the user's history.
    """

    name = "consents"

    async def export(self, conn: asyncpg.Connection, subject: Subject) -> ExportPart:
        ledger = await privacy_store.user_ledger(conn, subject.user_id)
        current = (await consent_store.current(conn, [subject.user_id]))[subject.user_id]
        now = datetime.now(UTC)
        return ExportPart(
            sections={"consents": ledger},
            consent={
                consent_store.change_key(purpose): consent_store.entry_document(entry)
                for purpose, entry in sorted(current.items())
                if entry.status_at(now) is ConsentStatus.GRANTED
            },
        )

    async def erase(self, conn: asyncpg.Connection, user_id: str, pseudonym: str) -> ErasedRows:
        await consent_store.lock_user(conn, user_id)
        return ErasedRows(other=await privacy_store.pseudonymise_ledger(conn, user_id, pseudonym))

    def after_erase(self, user_id: str, xid: int | None) -> None:
        """Nothing: the ledger's cache hears of the erasure as a local ERASURE commit."""
