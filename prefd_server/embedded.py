"""An embedded real PostgreSQL (the pgserver wheel) in the data directory, for DATABASE_URL-less runs."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EmbeddedPostgres:
    """Starts (or reuses) a PostgreSQL server whose files live under `data_dir/pg`."""

    def __init__(self, data_dir: Path) -> None:
        self._pgdata = (data_dir / "pg").resolve()
        self._server: Any = None

    async def start(self) -> str:
        """Start the server if needed and return its connection URI."""
        from pgserver import get_server  # imported lazily: only embedded runs need it

        self._pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.to_thread(get_server, self._pgdata, cleanup_mode="stop")
        uri: str = self._server.get_uri()
        log.info("embedded PostgreSQL ready", extra={"pgdata": str(self._pgdata)})
        return uri

    async def stop(self) -> None:
        """Stop the server once no other process of this data directory uses it."""
        if self._server is not None:
            await asyncio.to_thread(self._server.cleanup)
            self._server = None
