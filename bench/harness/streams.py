"""Streaming calls a benchmark holds open and the tasks reading them, closed together."""

from __future__ import annotations

import asyncio
from typing import Any


class StreamSet:
    """Streams a benchmark holds open and the tasks reading them; close() cancels both."""

    def __init__(self) -> None:
        self._calls: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def close(self) -> None:
        """Cancel every stream and its reader."""
        self._closing = True
        for call in self._calls:
            call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._calls.clear()
        self._tasks.clear()
