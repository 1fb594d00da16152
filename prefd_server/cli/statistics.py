"""prefd rebuild-statistics: forget every statistic and count the retained change feed again, in one command."""

from __future__ import annotations

import argparse
import time

from prefd_server.cli.admin import run_with_database
from prefd_server.cli.args import settings_from
from prefd_server.logs import configure_logging
from prefd_server.statistics.model import BatchOutcome


def cmd_rebuild_statistics(args: argparse.Namespace) -> int:
    """Reset the statistics and replay the change feed through the consumer until it is current."""
    from prefd_server.app import migrate_database
    from prefd_server.kernel.db import create_pool
    from prefd_server.preferences.cache import EffectiveCache
    from prefd_server.statistics.consumer import catch_up, connect, reset

    settings = settings_from(args)
    configure_logging(settings.log_level, settings.log_format)

    async def rebuild(dsn: str) -> tuple[BatchOutcome, float]:
        await migrate_database(dsn)
        pool = await create_pool(dsn, 1, 2, 0)
        catalog = EffectiveCache(pool, None)  # the definitions' category and sensitivity
        conn = await connect(dsn)
        try:
            started = time.monotonic()
            await reset(conn)
            # Each batch takes the position's row lock, so a server's runner counting at the same time
            # takes turns with this one and no change is counted twice.
            total = await catch_up(conn, catalog)
            return total, time.monotonic() - started
        finally:
            await conn.close()
            await catalog.close()
            await pool.close()

    total, elapsed = run_with_database(settings, rebuild)
    print(
        f"statistics rebuilt from {total.events} change rows ({total.counted} preference changes counted, "
        f"{total.erasures} erasures) over {len(total.keys)} keys in {elapsed:.1f} s"
    )
    return 0
