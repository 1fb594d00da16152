"""Builds the statistics domain on the kernel: the feed consumer's runner, the erasure participant, the service."""

from __future__ import annotations

from prefd_server.kernel.parts import KEY_CATALOG, Domain, Kernel
from prefd_server.settings import Settings
from prefd_server.statistics.consumer import StatisticsRunner
from prefd_server.statistics.privacy import StatisticsPrivacy
from prefd_server.statistics.service import StatisticsService


async def register(kernel: Kernel, settings: Settings) -> Domain:
    """Start the runner (counting while this process holds the runner lock, standing by otherwise),
    woken by this process's feed reader; take part in erasure; serve StatisticsService."""
    catalog = kernel.provisions.get(KEY_CATALOG)
    runner = StatisticsRunner(kernel.dsn, catalog)
    kernel.feed.add_listener(runner.on_changes)
    kernel.privacy.register(StatisticsPrivacy())
    runner.start()

    async def stop(_grace_s: float) -> None:
        await runner.stop()

    return Domain("statistics", [StatisticsService(kernel.pool, catalog, kernel.tokens)], stop)
