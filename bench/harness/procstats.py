"""Process trees, CPU seconds and resident memory of processes, read from Linux /proc."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import asyncpg


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, parents first."""
    found: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                pending.extend(int(child) for child in (task / "children").read_text().split())
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far (/proc/<pid>/stat), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; fields[0] is the state
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_rss_bytes(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of `pid` from /proc/<pid>/status, in bytes."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            value, unit = rest.split()
            if unit != "kB":
                raise ValueError(f"unexpected unit in /proc/{pid}/status: {line!r}")
            found[name] = int(value) * 1024
    return found


class PostgresCpu:
    """CPU seconds used by every process of the PostgreSQL server (best effort: None if unreadable)."""

    def __init__(self, postmaster: int | None) -> None:
        self.postmaster = postmaster

    @classmethod
    async def find(cls, conn: asyncpg.Connection) -> PostgresCpu:
        """The server's postmaster from its data directory (needs a superuser and the same machine)."""
        with contextlib.suppress(Exception):
            data_dir = await conn.fetchval("SHOW data_directory")
            pid = int((Path(data_dir) / "postmaster.pid").read_text().split()[0])
            cpu_seconds(pid)  # readable?
            return cls(pid)
        return cls(None)

    def seconds(self) -> float | None:
        """The CPU seconds of the postmaster and its children now (exited backends are lost)."""
        if self.postmaster is None:
            return None
        total = 0.0
        for pid in process_tree(self.postmaster):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += cpu_seconds(pid)
        return total
