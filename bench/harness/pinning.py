"""Which CPUs the servers and the load generators run on (servers on the first CPU, load on the rest)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Pinning:
    """The servers' CPUs and the load generator's (this process and what it spawns); None means unpinned."""

    enabled: bool
    server: set[int] | None
    client: set[int] | None

    @classmethod
    def choose(cls, pin: bool) -> Pinning:
        """Servers on the first CPU, load generator on the rest, when asked and there are >= 2 CPUs."""
        cpus = os.sched_getaffinity(0)
        if not pin or len(cpus) < 2:
            return cls(False, None, None)
        first = min(cpus)
        return cls(True, {first}, cpus - {first})

    def apply_to_self(self) -> None:
        """Move this process (the load generator, and children it spawns later) to its CPUs."""
        if self.client is not None:
            os.sched_setaffinity(0, self.client)

    def describe(self, server_name: str = "prefd") -> dict[str, Any]:
        """The report's "pinning" section."""
        return {
            "enabled": self.enabled,
            server_name: sorted(self.server) if self.server else "not pinned",
            "load_generator (this Python process)": sorted(self.client) if self.client else "not pinned",
            "postgresql": "not pinned",
        }


@contextlib.contextmanager
def spawn_affinity(cpus: set[int] | None) -> Iterator[None]:
    """Children forked inside this block inherit `cpus` (the forking thread's affinity)."""
    if cpus is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)
