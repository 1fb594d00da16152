"""Full collections: the survivors of each are frozen (the next walks only newer objects), and everything
is unfrozen on the interval; cyclic garbage among frozen objects is collected after the unfreeze."""

from __future__ import annotations

import asyncio
import gc

from prefd_server.collector import FullCollections


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


async def test_survivors_of_a_full_collection_are_frozen_and_unfrozen_on_the_interval() -> None:
    collections = FullCollections(unfreeze_s=0.3)
    gc.unfreeze()
    collections.start()
    try:
        kept = [Node() for _ in range(1000)]
        gc.collect()
        await asyncio.wait_for(collections.froze.wait(), 5)
        assert gc.get_freeze_count() >= len(kept)
        # Cyclic garbage made of frozen objects waits for the unfreeze, then goes with the next collection.
        a, b = kept[0], kept[1]
        a.other, b.other = b, a
        del kept, a, b
        await asyncio.wait_for(collections.thawed.wait(), 5)
        assert gc.get_freeze_count() == 0 or collections.frozen_after >= 2
        gc.collect()
        assert not any(isinstance(o, Node) and o.other is not None for o in gc.get_objects())
    finally:
        await collections.stop()
        gc.unfreeze()
