"""The statistics' part in a user's erasure: the user leaves every count in the erasure's transaction."""

from __future__ import annotations

import asyncpg

from prefd_server.kernel.model import Subject
from prefd_server.kernel.privacy import ErasedRows, ExportPart
from prefd_server.statistics.consumer import erase_user


class StatisticsPrivacy:
    """Exports nothing (the statistics keep no value a user set, only hashes to count by); on erasure,
    the values counted for the user are subtracted and the user's rows deleted at once. Its change rows,
    pseudonymised by the erasure, are counted later under the pseudonym and taken out again by the
    erasure's own change row, so the counts end where the database does."""

    name = "statistics"

    async def export(self, conn: asyncpg.Connection, subject: Subject) -> ExportPart:
        return ExportPart(sections={})

    async def erase(self, conn: asyncpg.Connection, user_id: str, pseudonym: str) -> ErasedRows:
        return ErasedRows(other=await erase_user(conn, user_id))

    def after_erase(self, user_id: str, xid: int | None) -> None:
        """Nothing: the statistics hold nothing outside PostgreSQL."""
