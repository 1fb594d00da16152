"""Wires the pool, the stores, the services and the gRPC server; starts and stops them in order."""

from __future__ import annotations

import asyncio
import logging
import signal
from types import TracebackType
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from prefd.v1 import ai_config_pb2, ai_config_pb2_grpc, audit_pb2, audit_pb2_grpc, preferences_pb2, preferences_pb2_grpc
from prefd.v1 import health_pb2 as prefd_health_pb2
from prefd.v1 import health_pb2_grpc as prefd_health_pb2_grpc
from prefd_server.aiconfig.cache import AIConfigCache
from prefd_server.aiconfig.model import env_layer
from prefd_server.aiconfig.privacy import AIConfigPrivacy
from prefd_server.aiconfig.secretbox import SecretBox
from prefd_server.aiconfig.service import AIConfigService
from prefd_server.aiconfig.writes import AIConfigStore
from prefd_server.audit.service import AuditService
from prefd_server.audit.store import HistoryStore
from prefd_server.audit.user_data_store import UserDataStore, pseudonym_key
from prefd_server.embedded import EmbeddedPostgres
from prefd_server.kernel.commits import LocalCommits
from prefd_server.kernel.db import create_pool, migrate
from prefd_server.kernel.feed import FeedReader, WakeupNotifier
from prefd_server.kernel.model import CallInfo, ChangeKind
from prefd_server.kernel.privacy import PrivacyRegistry
from prefd_server.kernel.tokens import TokenKey
from prefd_server.memory import return_large_buffers
from prefd_server.ops.checks import HealthChecker
from prefd_server.ops.database_store import DatabaseHealthStore
from prefd_server.ops.health_service import serving_status
from prefd_server.ops.maintenance_store import MaintenanceStore
from prefd_server.ops.metrics_endpoint import start_metrics_endpoint
from prefd_server.ops.monitor import HealthMonitor
from prefd_server.ops.service import HealthService
from prefd_server.preferences.cache import EffectiveCache, RedisLayers
from prefd_server.preferences.catalog import Catalog, load_catalog
from prefd_server.preferences.privacy import PreferencePrivacy
from prefd_server.preferences.reads import PreferenceReader
from prefd_server.preferences.restore import PreferenceRestorer
from prefd_server.preferences.service import PreferencesService
from prefd_server.preferences.writes import PreferenceWriter, install_definitions
from prefd_server.rpc.auth import TokenVerifier
from prefd_server.rpc.metrics import RpcMetrics
from prefd_server.rpc.middleware import Authenticator
from prefd_server.rpc.reflection import add_reflection
from prefd_server.rpc.tls import add_port
from prefd_server.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    preferences_pb2.DESCRIPTOR.services_by_name["PreferencesService"].full_name,
    ai_config_pb2.DESCRIPTOR.services_by_name["AIConfigService"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    prefd_health_pb2.DESCRIPTOR.services_by_name["HealthService"].full_name,
)

# Clients may ping every 10 s even without calls in flight; fewer pings never earn a GOAWAY.
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
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
    """One prefd server process: `async with App(settings) as app:` serves on app.port."""

    def __init__(self, settings: Settings, catalog: Catalog | None = None) -> None:
        self.settings = settings
        self.catalog = catalog or load_catalog(settings.definitions_file)
        self.port = 0
        self.dsn = ""
        self._embedded = None if settings.database_url else EmbeddedPostgres(settings.data_dir)
        self._pool: asyncpg.Pool | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self.feed: FeedReader | None = None
        self.cache: EffectiveCache | None = None
        self.ai_cache: AIConfigCache | None = None
        self._notifier: WakeupNotifier | None = None
        self._metrics_server: Any = None
        self.metrics_port = 0
        self._maintenance: MaintenanceStore | None = None

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

    async def start(self) -> None:
        settings = self.settings
        return_large_buffers()
        verifier = TokenVerifier(settings)
        self.dsn = await prepare_database(settings, self._embedded)
        applied = await migrate_database(self.dsn)
        if applied:
            log.info("migrations applied: %s", ", ".join(applied))
        self._pool = await create_pool(
            self.dsn, settings.db_pool_min, settings.db_pool_max, settings.db_statement_timeout_ms
        )
        added = await install_definitions(self._pool, self.catalog.definitions, CallInfo(actor="prefd:catalog"))
        if added:
            log.info("installed %d shipped definitions", len(added))
        reader = PreferenceReader(self._pool)
        installation = await reader.installation_id()
        redis = RedisLayers(settings.redis_url, installation, settings.redis_ttl_s) if settings.redis_url else None
        if redis is not None:
            await redis.ping()
        self.cache = EffectiveCache(self._pool, redis)
        self.feed = FeedReader(self._pool, self.dsn, settings.feed_poll_interval_s, settings.watch_queue_capacity)
        box = SecretBox(settings)
        ai_env = env_layer(
            settings.ai_model,
            settings.ai_temperature,
            settings.ai_max_tokens,
            settings.ai_api_key.get_secret_value() if settings.ai_api_key else None,
        )
        self.ai_cache = AIConfigCache(self._pool, box, ai_env)
        self.feed.add_listener(self.cache.on_changes)
        self.feed.add_listener(self.ai_cache.on_changes)
        await self.feed.start()
        if settings.feed_notify:
            self._notifier = WakeupNotifier(self._pool)
            self._notifier.start()
        commits = LocalCommits(self._wake_feed_readers)
        cache = self.cache
        ai_cache = self.ai_cache
        commits.add_listener(ChangeKind.PREFERENCE, cache.on_local_commit)
        commits.add_listener(ChangeKind.DEFINITION, lambda _scope, xid: cache.on_local_definition_commit(xid))
        commits.add_listener(ChangeKind.AI_CONFIG, ai_cache.on_local_commit)
        commits.add_listener(ChangeKind.AI_MODEL, lambda _scope, xid: ai_cache.on_local_catalog_commit(xid))
        commits.add_listener(ChangeKind.ERASURE, cache.on_local_commit)
        commits.add_listener(ChangeKind.ERASURE, ai_cache.on_local_commit)

        def feed_appended(xid: int) -> None:
            commits.committed(ChangeKind.BUDGET, xid=xid)

        writer = PreferenceWriter(self._pool, self.catalog.rules, commits)
        ai_store = AIConfigStore(self._pool, box, ai_env, commits)
        async with self._pool.acquire() as conn:
            pseudonym_secret = await pseudonym_key(conn)
        tokens = TokenKey.derive(installation, pseudonym_secret)
        # Export and erasure reach each domain's data through its privacy participant.
        privacy = PrivacyRegistry()
        privacy.register(PreferencePrivacy())
        privacy.register(AIConfigPrivacy(redis))
        self._maintenance = MaintenanceStore(self._pool, self.dsn, feed_appended)

        server = grpc.aio.server(
            options=[*KEEPALIVE_OPTIONS, ("grpc.so_reuseport", 1 if settings.workers > 1 else 0)],
        )
        # prefd's services need a token; grpc.health.v1 and reflection do not.
        registry = CollectorRegistry()
        # A call's ceiling without a client deadline (server.deadline.DEFAULT_CALL_TIMEOUT_S unless set).
        authenticator = Authenticator(verifier, RpcMetrics(registry), settings.call_timeout_s)
        authenticator.add_service(
            server,
            preferences_pb2_grpc.add_PreferencesServiceServicer_to_server,
            PreferencesService(
                reader,
                writer,
                self.cache,
                self.feed,
                tokens,
                settings.watch_progress_interval_s,
                pseudonym_secret,
            ),
        )
        authenticator.add_service(
            server,
            audit_pb2_grpc.add_AuditServiceServicer_to_server,
            AuditService(
                HistoryStore(self._pool),
                UserDataStore(self._pool, privacy, commits),
                PreferenceRestorer(writer),
                tokens,
            ),
        )
        authenticator.add_service(
            server,
            ai_config_pb2_grpc.add_AIConfigServiceServicer_to_server,
            AIConfigService(
                ai_store,
                self.ai_cache,
                self.feed,
                redis,
                tokens,
                settings.watch_progress_interval_s,
                feed_appended,
                pseudonym_secret,
            ),
        )
        authenticator.add_service(
            server,
            prefd_health_pb2_grpc.add_HealthServiceServicer_to_server,
            HealthService(
                HealthChecker(self._pool, redis, self.feed, settings.health_timeout_s),
                DatabaseHealthStore(self._pool, settings.long_transaction_alert_s),
                self._maintenance,
                settings.slow_query_threshold_ms / 1000,
                tokens,
            ),
        )
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        add_reflection(server, (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
        # TLS only when a certificate is configured (mTLS with a client CA), else plaintext.
        self.port = add_port(server, settings)
        if self.port == 0:
            raise OSError(f"could not bind {settings.host}:{settings.port}")
        if settings.metrics_port is not None:
            self._metrics_server = start_metrics_endpoint(
                registry, settings.metrics_port, settings.metrics_host, self.feed, self.cache.stats, self._pool, redis
            )
            self.metrics_port = self._metrics_server.server_port
        monitor = HealthMonitor(
            self._pool,
            serving_status(self._health, SERVICE_NAMES),
            settings.health_interval_s,
            settings.health_timeout_s,
        )
        await monitor.check_once()
        self._monitor_task = asyncio.create_task(monitor.run(), name="prefd-health")
        await server.start()
        self._server = server
        log.info("prefd serving on port %d", self.port)

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls, let in-flight ones finish within `grace` seconds, then release everything."""
        if self.feed is not None:
            # Watch streams end now with UNAVAILABLE and their cursor; unary calls drain below.
            await self.feed.stop("server stopping; resume from your cursor")
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._maintenance is not None:
            await self._maintenance.stop(grace or 0)
            self._maintenance = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        if self._notifier is not None:
            await self._notifier.stop()
            self._notifier = None
        if self.cache is not None:
            await self.cache.close()
            self.cache = None
        self.feed = None
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            await asyncio.gather(self._monitor_task, return_exceptions=True)
            self._monitor_task = None
        if self._pool is not None:
            try:
                # Connections stuck on a hung server never come back: close what can be closed.
                async with asyncio.timeout(max(grace or 0, 1.0)):
                    await self._pool.close()
            except TimeoutError:
                self._pool.terminate()
            self._pool = None
        if self._embedded is not None:
            await self._embedded.stop()

    def _wake_feed_readers(self) -> None:
        """After a local commit: the local feed reader reads now, other processes' on NOTIFY."""
        if self.feed is not None:
            self.feed.wake()
        if self._notifier is not None:
            self._notifier.notify()

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "App not started"
        return self._pool


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
