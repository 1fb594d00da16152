"""Short full collections of the garbage collector while caches hold many objects.

A full (generation 2) collection walks every tracked object; with caches of many subjects that is
hundreds of thousands of objects and a pause of 150-250 ms on this machine, every 20 s or so under load.
After each full collection its survivors are frozen (`gc.freeze()`): they have lived through one, and
the next full collection walks only what arrived since. Frozen objects are still freed when their last
reference goes (cache entries are acyclic); only cyclic garbage among them waits, until every
`unfreeze_s` (default an hour) everything is unfrozen and the next full collection walks it all once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any

UNFREEZE_S = 3600.0


class FullCollections:
    """Freezes the survivors of every full collection; unfreezes everything every `unfreeze_s`."""

    def __init__(self, unfreeze_s: float = UNFREEZE_S) -> None:
        self._unfreeze_s = unfreeze_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.frozen_after = 0  # full collections whose survivors were frozen
        self.unfrozen = 0
        self.froze = asyncio.Event()  # set after each freeze
        self.thawed = asyncio.Event()  # set after each unfreeze

    def start(self) -> None:
        """Watch collections from now on (call on the event loop that serves)."""
        self._loop = asyncio.get_running_loop()
        gc.callbacks.append(self._collected)
        self._task = self._loop.create_task(self._unfreeze_periodically(), name="prefd-gc-unfreeze")

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._collected)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _collected(self, phase: str, info: dict[str, Any]) -> None:
        # Any thread may collect; the freeze runs on the loop, after the collection has finished.
        if phase == "stop" and info["generation"] == 2 and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._freeze)

    def _freeze(self) -> None:
        gc.freeze()
        self.frozen_after += 1
        self.froze.set()

    async def _unfreeze_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._unfreeze_s)
            gc.unfreeze()
            self.unfrozen += 1
            self.thawed.set()
