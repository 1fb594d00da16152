"""The baseline for bench/watch_memory.py: a bare grpc.aio server whose watch streams only idle.

It serves ``/prefd.v1.PreferencesService/WatchPreferences`` (server streaming) through a generic
handler with no auth, no database and no feed: each call is answered with one prebuilt
WatchPreferencesResponse carrying ``started`` and then stays open, its handler awaiting forever,
until the client cancels or the server stops. What one such stream costs in memory is the floor
grpc.aio itself sets (call state, HTTP/2 stream, one asyncio task per call).

The server is a plain ``grpc.aio.server()`` (default options, no interceptors). It prints
``idle serving on port N`` once it accepts calls and stops on SIGTERM or SIGINT.

    python bench/idle_watch_server.py [--host 127.0.0.1] [--port 0]
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from harness.plain_server import run_plain

from prefd.v1 import common_pb2, preferences_pb2

SERVICE = "prefd.v1.PreferencesService"
METHOD = "WatchPreferences"
STARTED = preferences_pb2.WatchPreferencesResponse(
    started=common_pb2.WatchStarted(cursor=common_pb2.Cursor(token="idle-baseline"))
).SerializeToString()


def build_handler() -> grpc.GenericRpcHandler:
    """A generic handler for SERVICE/METHOD: one `started` message, then idle until cancelled."""

    async def watch(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        yield STARTED
        await asyncio.Event().wait()  # never set: the call ends when the client cancels it

    # No request_deserializer / response_serializer: the handler sees and returns raw bytes.
    return grpc.method_handlers_generic_handler(SERVICE, {METHOD: grpc.unary_stream_rpc_method_handler(watch)})


def main() -> None:
    run_plain(build_handler, "idle", "Bare grpc.aio server with idle WatchPreferences streams.")


if __name__ == "__main__":
    main()
