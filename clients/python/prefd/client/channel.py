"""Channel settings the server accepts, and the async client."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from prefd.client.errors import from_rpc_error
from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc

# Retries idempotent reads on UNAVAILABLE (a restarting or briefly unreachable server).
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "prefd.v1.PreferencesService", "method": m}
                    for m in (
                        "GetEffectivePreferences",
                        "BatchGetEffectivePreferences",
                        "ListPreferences",
                        "GetDefinition",
                        "ListDefinitions",
                    )
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

Response = TypeVar("Response")
TokenProvider = Callable[[], str]


def channel_options() -> list[tuple[str, Any]]:
    """Keepalive every 30 s (the server allows pings every 10 s) and the retry service config."""
    return [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", SERVICE_CONFIG),
    ]


class AsyncPrefdClient:
    """An async prefd client: one channel, a bearer token on every call, a default deadline."""

    def __init__(
        self,
        target: str,
        token: str | TokenProvider,
        *,
        timeout_s: float = 5.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._token = token if callable(token) else (lambda: token)
        self._timeout_s = timeout_s
        options = channel_options()
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=options)
            if credentials
            else grpc.aio.insecure_channel(target, options=options)
        )
        self.preferences = preferences_pb2_grpc.PreferencesServiceStub(self._channel)

    async def __aenter__(self) -> AsyncPrefdClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def call(self, method: Callable[..., Awaitable[Response]], request: Any) -> Response:
        """Invoke a stub method with the token and deadline; raises PrefdError / ValidationError."""
        try:
            return await method(
                request, metadata=(("authorization", f"Bearer {self._token()}"),), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def get_effective(
        self, user_id: str, org_id: str = "", *, key_prefixes: Sequence[str] = (), categories: Sequence[str] = ()
    ) -> preferences_pb2.GetEffectivePreferencesResponse:
        """A subject's effective preferences with provenance and cursor."""
        request = preferences_pb2.GetEffectivePreferencesRequest(
            subject=common_pb2.Subject(user_id=user_id, org_id=org_id),
            key_prefixes=list(key_prefixes),
            categories=list(categories),
        )
        return await self.call(self.preferences.GetEffectivePreferences, request)

    async def set_preferences(
        self, request: preferences_pb2.SetPreferencesRequest
    ) -> preferences_pb2.SetPreferencesResponse:
        """SetPreferences with typed errors."""
        return await self.call(self.preferences.SetPreferences, request)
