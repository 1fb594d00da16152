"""PrefdClient: the blocking client for threaded code, running an AsyncPrefdClient on its own
event-loop thread. Any thread may call it; views' callbacks run on the client's thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from prefd.client.channel import AsyncPrefdClient, TLSConfig, TokenProvider
from prefd.client.rpcs import SyncRpcs
from prefd.client.views import AIConfigView, Backoff, PreferencesView

T = TypeVar("T")


class PrefdClient(SyncRpcs):
    """`with PrefdClient("localhost:50051", token=...) as client:` one blocking method per RPC
    (`client.set_preferences(request)`), and live views (`client.preferences(user_id)`) whose reads
    never block."""

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
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="prefd-client", daemon=True)
        self._thread.start()

        async def make() -> AsyncPrefdClient:
            # grpc.aio binds a channel to the loop it is created on.
            return AsyncPrefdClient(
                target, token, timeout_s=timeout_s, credentials=credentials, tls=tls, options=options
            )

        self._client = self._run(make())

    def __enter__(self) -> PrefdClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the views, close the channel and end the client's thread."""
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _run(self, awaitable: Awaitable[T]) -> T:
        async def run() -> T:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def _unary(self, service: str, method: str, request: Any, timeout: float | None = None) -> Any:
        return self._run(self._client._unary(service, method, request, timeout))

    def _stream(self, service: str, method: str, request: Any, timeout: float | None = None) -> Iterator[Any]:
        messages = self._client._stream(service, method, request, timeout)
        try:
            while True:
                try:
                    yield self._run(anext(messages))
                except StopAsyncIteration:
                    return
        finally:
            close = getattr(messages, "aclose", None)
            if close is not None:
                self._run(close())

    def preferences(
        self,
        user_id: str,
        org_id: str = "",
        *,
        key_prefixes: Sequence[str] = (),
        grace_s: float = 5.0,
        raise_when_stale: bool = False,
        backoff: Backoff | None = None,
    ) -> PreferencesView:
        """A live view of a subject's effective preferences (see AsyncPrefdClient.preferences)."""
        return self._run(
            self._client.preferences(
                user_id,
                org_id,
                key_prefixes=key_prefixes,
                grace_s=grace_s,
                raise_when_stale=raise_when_stale,
                backoff=backoff,
            )
        )

    def ai_config(
        self,
        user_id: str,
        org_id: str = "",
        *,
        grace_s: float = 5.0,
        raise_when_stale: bool = False,
        backoff: Backoff | None = None,
    ) -> AIConfigView:
        """A live view of a subject's effective AI configuration (see AsyncPrefdClient.ai_config)."""
        return self._run(
            self._client.ai_config(user_id, org_id, grace_s=grace_s, raise_when_stale=raise_when_stale, backoff=backoff)
        )
