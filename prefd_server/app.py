"""Builds the kernel once, lets each domain register itself on it, serves gRPC, and stops in order."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from prefd_server.aiconfig import domain as aiconfig_domain
from prefd_server.audit import domain as audit_domain
from prefd_server.collector import FullCollections
from prefd_server.embedded import EmbeddedPostgres
from prefd_server.kernel.bounded_cache import CacheBudget
from prefd_server.kernel.commits import LocalCommits
from prefd_server.kernel.db import breaker_of, create_pool, installation_identity, migrate
from prefd_server.kernel.feed import FeedReader, WakeupNotifier
from prefd_server.kernel.parts import CACHE_FIGURES, Domain, Kernel
from prefd_server.kernel.privacy import PrivacyRegistry
from prefd_server.kernel.redis import RedisLayers
from prefd_server.kernel.scoped_cache import MAX_LOADS_IN_FLIGHT
from prefd_server.kernel.tokens import TokenKey
from prefd_server.memory import return_large_buffers
from prefd_server.notifications import domain as notifications_domain
from prefd_server.ops import domain as ops_domain
from prefd_server.ops.health_service import serving_status
from prefd_server.ops.metrics_endpoint import start_metrics_endpoint
from prefd_server.ops.monitor import HealthMonitor
from prefd_server.preferences import domain as preferences_domain
from prefd_server.rpc.auth import TokenVerifier
from prefd_server.rpc.metrics import RpcMetrics
from prefd_server.rpc.middleware import Authenticator, add_servicer_generic
from prefd_server.rpc.reflection import add_reflection
from prefd_server.rpc.tls import add_port
from prefd_server.rpc.tracing import TracingSettings, start_tracing, tracing_settings
from prefd_server.settings import Settings
from prefd_server.statistics import domain as statistics_domain

if TYPE_CHECKING:
    from prefd_server.rpc.tracing_otel import RpcTracing

log = logging.getLogger(__name__)

Register = Callable[[Kernel, Settings], Awaitable[Domain]]
# In order: a domain may use what one registered before it provides (audit's rollback uses the
# restorer preferences provides). A new domain is one more line here and nothing else.
DOMAINS: Sequence[Register] = (
    preferences_domain.register,
    statistics_domain.register,
    aiconfig_domain.register,
    notifications_domain.register,
    audit_domain.register,
    ops_domain.register,
)
GRPC_HEALTH_SERVICE: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

# Clients may ping every 10 s even without calls in flight; fewer pings never earn a GOAWAY.
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]
# Calls the transport has accepted but the server has not yet picked up: gRPC's default (1,000, hard
# limit 3,000) cancels the rest, so 10,000 watchers reconnecting at once after a restart would mostly
# be refused with CANCELLED. Each waits as a small C-core call until its handler starts.
PENDING_CALL_OPTIONS = [
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 40_000),
]


async def prepare_database(settings: Settings, embedded: EmbeddedPostgres | None) -> str:
    """The DSN to use: DATABASE_URL, else the embedded server's (started now)."""
    if settings.database_url:
        return settings.database_url
    assert embedded is not None
    return await embedded.start()


async def migrate_database(dsn: str) -> list[str]:
    """Apply pending migrations on one dedicated connection."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


class App:
    """One prefd server process: `async with App(settings) as app:` serves on app.port.

    OpenTelemetry tracing as the OTEL_* variables of the environment ask (prefd_server/rpc/tracing.py:
    off unless they do), or as `tracing` says."""

    def __init__(self, settings: Settings, tracing: TracingSettings | None = None) -> None:
        self.settings = settings
        self._tracing_settings = tracing if tracing is not None else tracing_settings(os.environ)
        self.tracing: RpcTracing | None = None
        self.port = 0
        self.metrics_port = 0
        self.dsn = ""
        self.kernel: Kernel | None = None
        self.domains: dict[str, Domain] = {}
        self._embedded = None if settings.database_url else EmbeddedPostgres(settings.data_dir)
        self._pool: asyncpg.Pool | None = None
        self._read_pool: asyncpg.Pool | None = None
        self._probe_pool: asyncpg.Pool | None = None
        self._collections = FullCollections()
        self._redis: RedisLayers | None = None
        self._notifier: WakeupNotifier | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._metrics_server: Any = None

    async def __aenter__(self) -> App:
        try:
            await self.start()
        except BaseException:
            await self.stop(0)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop(self.settings.grace_period_s)

    @property
    def feed(self) -> FeedReader | None:
        """This process's change-feed reader (None before start and after stop)."""
        return self.kernel.feed if self.kernel is not None else None

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "App not started"
        return self._pool

    async def start(self) -> None:
        """Kernel, then each domain, then the gRPC server with every domain's servicers."""
        settings = self.settings
        return_large_buffers()
        verifier = TokenVerifier(settings)
        # First: the instrumentations patch asyncpg and redis before any connection is made.
        self.tracing = start_tracing(self._tracing_settings)
        kernel = self.kernel = await self._build_kernel()
        for register in DOMAINS:
            domain = await register(kernel, settings)
            self.domains[domain.name] = domain
        await kernel.feed.start()
        if settings.feed_notify:
            self._notifier = WakeupNotifier(kernel.pool)
            self._notifier.start()
        servicers = [servicer for domain in self.domains.values() for servicer in domain.servicers]
        service_names = tuple(servicer.SERVICE_NAME for servicer in servicers)

        server = grpc.aio.server(
            options=[
                *KEEPALIVE_OPTIONS,
                *PENDING_CALL_OPTIONS,
                ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
            ],
        )
        registry = CollectorRegistry()
        # prefd's services need a token; grpc.health.v1 and reflection do not.
        authenticator = Authenticator(verifier, RpcMetrics(registry), settings.call_timeout_s, tracing=self.tracing)
        for servicer in servicers:
            authenticator.add_service(server, servicer.add_to_server, servicer)
        self._health = health.aio.HealthServicer()
        add_servicer_generic(server, health_pb2_grpc.add_HealthServicer_to_server, self._health)
        add_reflection(server, (*service_names, GRPC_HEALTH_SERVICE))
        # TLS only when a certificate is configured (mTLS with a client CA), else plaintext.
        self.port = add_port(server, settings)
        if self.port == 0:
            raise OSError(f"could not bind {settings.host}:{settings.port}")
        if settings.metrics_port is not None:
            figures = kernel.provisions.get(CACHE_FIGURES)
            self._metrics_server = start_metrics_endpoint(
                registry,
                settings.metrics_port,
                settings.metrics_host,
                kernel.feed,
                figures,
                kernel.pool,
                kernel.redis,
                kernel.caches,
            )
            self.metrics_port = self._metrics_server.server_port
        # The monitor probes on a connection of its own: calls holding every pooled connection under load
        # are not PostgreSQL being down, and must not make a probe wait for one.
        self._probe_pool = await create_pool(
            self.dsn,
            1,
            1,
            self.settings.db_statement_timeout_ms,
            single_statements=True,
            breaker=breaker_of(kernel.pool),
        )
        monitor = HealthMonitor(
            self._probe_pool,
            serving_status(self._health, service_names),
            settings.health_interval_s,
            settings.health_timeout_s,
        )
        await monitor.check_once()
        kernel.feed.on_answered_while_down(monitor.recheck)
        self._monitor_task = asyncio.create_task(monitor.run(), name="prefd-health")
        # What start-up built lives as long as the process: out of the garbage collector's full passes;
        # later survivors of each full pass too (prefd_server/collector.py).
        gc.collect()
        gc.freeze()
        self._collections.start()
        await server.start()
        self._server = server
        log.info("prefd serving on port %d", self.port)

    async def _build_kernel(self) -> Kernel:
        """Database (migrated), pool, Redis, feed reader, token key, commit hooks and privacy registry."""
        settings = self.settings
        self.dsn = await prepare_database(settings, self._embedded)
        applied = await migrate_database(self.dsn)
        if applied:
            log.info("migrations applied: %s", ", ".join(applied))
        pool = self._pool = await create_pool(
            self.dsn, settings.db_pool_min, settings.db_pool_max, settings.db_statement_timeout_ms
        )
        self._read_pool = await create_pool(
            self.dsn,
            1,
            MAX_LOADS_IN_FLIGHT,
            settings.db_statement_timeout_ms,
            single_statements=True,
            breaker=breaker_of(pool),
        )
        installation, pseudonym_key = await installation_identity(pool)
        if settings.redis_url:
            self._redis = RedisLayers(settings.redis_url, installation, settings.redis_ttl_s)
            await self._redis.ping()
        feed = FeedReader(pool, self.dsn, settings.feed_poll_interval_s, settings.watch_queue_capacity)
        return Kernel(
            pool=pool,
            dsn=self.dsn,
            installation=installation,
            feed=feed,
            redis=self._redis,
            tokens=TokenKey.derive(installation, pseudonym_key),
            pseudonym_key=pseudonym_key,
            commits=LocalCommits(self._wake_feed_readers),
            privacy=PrivacyRegistry(),
            caches=CacheBudget(settings.cache_bytes),
            read_pool=self._read_pool,
        )

    def _wake_feed_readers(self) -> None:
        """After a local commit: the local feed reader reads now, other processes' on NOTIFY."""
        if self.kernel is not None:
            self.kernel.feed.wake()
        if self._notifier is not None:
            self._notifier.notify()

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls, let in-flight ones finish within `grace` seconds, then release everything."""
        if self.kernel is not None:
            # Watch streams end now with UNAVAILABLE and their cursor; unary calls drain below.
            await self.kernel.feed.stop("server stopping; resume from your cursor")
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        await self._collections.stop()
        for domain in reversed(list(self.domains.values())):
            if domain.stop is not None:
                await domain.stop(grace or 0)
        self.domains = {}
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        if self._notifier is not None:
            await self._notifier.stop()
            self._notifier = None
        if self._redis is not None:
            await self._redis.close()
            self._redis = None
        self.kernel = None
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            await asyncio.gather(self._monitor_task, return_exceptions=True)
            self._monitor_task = None
        for pool in (self._probe_pool, self._read_pool, self._pool):
            if pool is None:
                continue
            try:
                # Connections stuck on a hung server never come back: close what can be closed.
                async with asyncio.timeout(max(grace or 0, 1.0)):
                    await pool.close()
            except TimeoutError:
                pool.terminate()
        self._pool = self._read_pool = self._probe_pool = None
        if self._embedded is not None:
            await self._embedded.stop()
        if self.tracing is not None:
            await self.tracing.shutdown()
            self.tracing = None


async def serve_until_signalled(settings: Settings, on_ready: Any = None) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with App(settings) as app:
        if on_ready is not None:
            on_ready(app)
        await stop.wait()
        log.info("signal received; draining for up to %.1f s", settings.grace_period_s)
