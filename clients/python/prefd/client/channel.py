"""Channel settings the server accepts, and the async client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from prefd.client.errors import from_rpc_error
from prefd.client.rpcs import AsyncRpcs
from prefd.client.views import AIConfigView, Backoff, PreferencesView
from prefd.v1 import (
    ai_config_pb2_grpc,
    audit_pb2_grpc,
    common_pb2,
    health_pb2_grpc,
    notifications_pb2_grpc,
    preferences_pb2,
    preferences_pb2_grpc,
    statistics_pb2_grpc,
    templates_pb2_grpc,
)

# Idempotent reads retried on UNAVAILABLE (a restarting or briefly unreachable server).
_RETRYABLE_READS = {
    "prefd.v1.PreferencesService": (
        "GetEffectivePreferences",
        "BatchGetEffectivePreferences",
        "ListPreferences",
        "GetDefinition",
        "ListDefinitions",
    ),
    "prefd.v1.AIConfigService": (
        "GetAIConfig",
        "ListAIConfigs",
        "GetEffectiveAIConfig",
        "ListModels",
        "EstimateCost",
        "GetBudgetStatus",
    ),
    "prefd.v1.AuditService": ("ListChanges", "GetChange", "DiffScope", "PreviewRollback", "ExportUserData"),
    "prefd.v1.StatisticsService": ("GetKeyStatistics", "GetCategoryStatistics", "GetAdoption", "ListDailyRollups"),
    "prefd.v1.TemplateService": ("GetTemplate", "ListTemplates"),
    "prefd.v1.HealthService": (
        "GetSystemHealth",
        "GetDatabaseHealth",
        "GetMaintenanceOperation",
        "ListMaintenanceOperations",
    ),
}
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": service, "method": method}
                    for service, methods in _RETRYABLE_READS.items()
                    for method in methods
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

TokenProvider = Callable[[], str]
_STUBS: dict[str, Callable[[grpc.aio.Channel], Any]] = {
    "prefd.v1.PreferencesService": preferences_pb2_grpc.PreferencesServiceStub,
    "prefd.v1.AIConfigService": ai_config_pb2_grpc.AIConfigServiceStub,
    "prefd.v1.AuditService": audit_pb2_grpc.AuditServiceStub,
    "prefd.v1.HealthService": health_pb2_grpc.HealthServiceStub,
    "prefd.v1.NotificationService": notifications_pb2_grpc.NotificationServiceStub,
    "prefd.v1.StatisticsService": statistics_pb2_grpc.StatisticsServiceStub,
    "prefd.v1.TemplateService": templates_pb2_grpc.TemplateServiceStub,
}


def channel_options() -> list[tuple[str, Any]]:
    """Keepalive every 30 s (the server allows pings every 10 s) and the retry service config."""
    return [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", SERVICE_CONFIG),
    ]


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """TLS to a prefd server: the CA certificates to trust (PEM; None trusts the system's roots), a
    client certificate chain and its private key when the server requires client certificates (mTLS),
    and the name the server's certificate carries when it is not the target's host."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs its private key, and a private key its certificate")

    @classmethod
    def from_files(
        cls,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        server_name: str | None = None,
    ) -> TLSConfig:
        """Read PEM files; ValueError naming the argument when one cannot be read or is missing its pair."""
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together: a client certificate needs its private key")
        return cls(
            root_certificates=_read("ca_file", ca_file),
            certificate_chain=_read("cert_file", cert_file),
            private_key=_read("key_file", key_file),
            server_name=server_name or None,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials for grpc.secure_channel / grpc.aio.secure_channel."""
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def options(self) -> list[tuple[str, Any]]:
        """Channel options: the server name to verify, when it is not the target's host."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _read(argument: str, path: str | Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{argument}: cannot read {path}: {exc.strerror or exc}") from exc


class AsyncPrefdClient(AsyncRpcs):
    """An async prefd client: one channel, a bearer token on every call, a default deadline on
    every unary call, typed errors (PrefdError / ValidationError), one method per RPC
    (`await client.set_preferences(request)`), and live views (`await client.preferences(user_id)`).

    An empty token sends calls without one (a server under mTLS may take the client certificate as
    the caller). `tls`: a TLSConfig (`TLSConfig.from_files(ca_file=..., cert_file=..., key_file=...)`) for a
    server that speaks TLS; or `credentials`, any grpc.ChannelCredentials; neither for plaintext.
    """

    def __init__(
        self,
        target: str,
        token: str | TokenProvider,
        *,
        timeout_s: float = 5.0,
        credentials: grpc.ChannelCredentials | None = None,
        tls: TLSConfig | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if tls is not None:
            if credentials is not None:
                raise ValueError("pass either tls or credentials, not both")
            credentials = tls.credentials()
            options = [*tls.options(), *options]
        self._token = token if callable(token) else (lambda: token)
        self._timeout_s = timeout_s
        merged = [*channel_options(), *options]
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=merged)
            if credentials
            else grpc.aio.insecure_channel(target, options=merged)
        )
        self._stubs = {name: make(self._channel) for name, make in _STUBS.items()}
        self._views: list[PreferencesView | AIConfigView] = []

    async def __aenter__(self) -> AsyncPrefdClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every view this client opened and close the channel."""
        for view in self._views:
            await view.close()
        await self._channel.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        # No token (""): the call goes without one, for a server that takes the client certificate as the caller.
        token = self._token()
        return (("authorization", f"Bearer {token}"),) if token else ()

    async def _unary(self, service: str, method: str, request: Any, timeout: float | None = None) -> Any:
        call = getattr(self._stubs[service], method)
        try:
            return await call(request, metadata=self._metadata(), timeout=timeout or self._timeout_s)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def _stream(
        self, service: str, method: str, request: Any, timeout: float | None = None
    ) -> AsyncIterator[Any]:
        call = getattr(self._stubs[service], method)(request, metadata=self._metadata(), timeout=timeout)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    # --- conveniences ----------------------------------------------------------------------

    async def get_effective(
        self, user_id: str, org_id: str = "", *, key_prefixes: Sequence[str] = (), categories: Sequence[str] = ()
    ) -> preferences_pb2.GetEffectivePreferencesResponse:
        """A subject's effective preferences with provenance and cursor."""
        request = preferences_pb2.GetEffectivePreferencesRequest(
            subject=common_pb2.Subject(user_id=user_id, org_id=org_id),
            key_prefixes=list(key_prefixes),
            categories=list(categories),
        )
        return await self.get_effective_preferences(request)

    # --- live views ------------------------------------------------------------------------

    async def preferences(
        self,
        user_id: str,
        org_id: str = "",
        *,
        key_prefixes: Sequence[str] = (),
        grace_s: float = 5.0,
        raise_when_stale: bool = False,
        backoff: Backoff | None = None,
    ) -> PreferencesView:
        """A live view of a subject's effective preferences: returned once its snapshot is loaded and
        its watch is running; raises PrefdError at once for a bad token, a subject the token may not
        read, or an unreachable server."""
        view = PreferencesView(
            self._unary,
            self._stream,
            common_pb2.Subject(user_id=user_id, org_id=org_id),
            key_prefixes,
            grace_s=grace_s,
            raise_when_stale=raise_when_stale,
            backoff=backoff or Backoff(),
            open_timeout_s=self._timeout_s,
        )
        await view.start()
        self._views.append(view)
        return view

    async def ai_config(
        self,
        user_id: str,
        org_id: str = "",
        *,
        grace_s: float = 5.0,
        raise_when_stale: bool = False,
        backoff: Backoff | None = None,
    ) -> AIConfigView:
        """A live view of a subject's effective AI configuration and its budget events."""
        view = AIConfigView(
            self._unary,
            self._stream,
            common_pb2.Subject(user_id=user_id, org_id=org_id),
            grace_s=grace_s,
            raise_when_stale=raise_when_stale,
            backoff=backoff or Backoff(),
            open_timeout_s=self._timeout_s,
        )
        await view.start()
        self._views.append(view)
        return view
