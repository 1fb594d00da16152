"""SQL over PostgreSQL's statistics views for GetDatabaseHealth."""

from __future__ import annotations

from typing import Any

import asyncpg


class DatabaseHealthStore:
    """Reads the database report for prefd's own tables."""

    def __init__(self, pool: asyncpg.Pool, long_transaction_alert_s: float) -> None:
        self.pool = pool
        self.long_transaction_alert_s = long_transaction_alert_s

    async def report(self, slow_query_threshold_s: float) -> Any:
        raise NotImplementedError
