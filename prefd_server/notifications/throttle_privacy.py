"""The throttles' part in a user's erasure: their counters name the user, so they go (nothing to export)."""

from __future__ import annotations

import asyncio

import asyncpg

from prefd_server.kernel.model import Subject
from prefd_server.kernel.privacy import ErasedRows, ExportPart
from prefd_server.notifications.throttle import Throttles
from prefd_server.notifications.throttle_store import delete_user_throttles


class ThrottlePrivacy:
    """Throttle windows are operational counters, not the user's data: nothing exported, all erased."""

    name = "notification_throttles"

    def __init__(self, throttles: Throttles) -> None:
        self._throttles = throttles
        self._cleanups: set[asyncio.Task[None]] = set()

    async def export(self, conn: asyncpg.Connection, subject: Subject) -> ExportPart:
        return ExportPart(sections={})

    async def erase(self, conn: asyncpg.Connection, user_id: str, pseudonym: str) -> ErasedRows:
        return ErasedRows(other=await delete_user_throttles(conn, user_id))

    def after_erase(self, user_id: str, xid: int | None) -> None:
        """Drop the user's Redis counters in the background (the erasure has committed)."""
        task = asyncio.ensure_future(self._throttles.forget(user_id))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
