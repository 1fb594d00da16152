"""The serving loop of the baseline servers (echo, idle-watch, fan-out floor): a plain grpc.aio server."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable

import grpc


async def serve_plain(handler: grpc.GenericRpcHandler, name: str, host: str, port: int, grace_s: float) -> None:
    """A plain ``grpc.aio.server()`` (default options, no interceptors) with `handler`; prints
    ``<name> serving on port N`` once it accepts calls, serves until SIGTERM or SIGINT, then stops
    within `grace_s` seconds."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    print(f"{name} serving on port {bound}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop(grace_s)


def run_plain(build_handler: Callable[[], grpc.GenericRpcHandler], name: str, description: str) -> None:
    """The command line of a baseline server taking only --host, --port and --grace: serve_plain with
    the handler `build_handler` returns (called inside the event loop) until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--grace", type=float, default=1.0, help="seconds to drain on shutdown (default 1)")
    args = parser.parse_args()

    async def serve() -> None:
        await serve_plain(build_handler(), name, args.host, args.port, args.grace)

    asyncio.run(serve())
