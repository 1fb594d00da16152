"""The baseline for bench/effective_read.py: a trivial grpc.aio server with no auth and no database.

It serves the same method path as prefd, ``/prefd.v1.PreferencesService/GetEffectivePreferences``
by default or the one given with ``--method`` (bench/ai_effective_read.py passes
``/prefd.v1.AIConfigService/GetEffectiveAIConfig``), through a generic handler that does no
protobuf work at all: every call gets the same prebuilt, already serialized response
(``--response-file``, e.g. one real GetEffectivePreferencesResponse captured from prefd), or,
without a file, its own request bytes echoed back. What is left is the cost of grpc.aio itself:
HTTP/2, framing, one asyncio handler per call.

The server is a plain ``grpc.aio.server()`` (default options, no interceptors). It prints
``echo serving on port N`` once it accepts calls and stops on SIGTERM or SIGINT.

    python bench/echo_server.py [--host 127.0.0.1] [--port 0] [--response-file resp.bin]
        [--method /prefd.v1.PreferencesService/GetEffectivePreferences]
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc
from harness.plain_server import serve_plain

DEFAULT_METHOD = "/prefd.v1.PreferencesService/GetEffectivePreferences"


def split_method(path: str) -> tuple[str, str]:
    """'/package.Service/Method' as ('package.Service', 'Method'); ValueError otherwise."""
    service, sep, method = path.removeprefix("/").partition("/")
    if not path.startswith("/") or not sep or not service or not method or "/" in method:
        raise ValueError(f"not a gRPC method path like /package.Service/Method: {path!r}")
    return service, method


def build_handler(payload: bytes | None, path: str = DEFAULT_METHOD) -> grpc.GenericRpcHandler:
    """A generic handler for the method `path` answering `payload`, or echoing the request when None."""

    async def respond(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request if payload is None else payload

    service, method = split_method(path)
    # No request_deserializer / response_serializer: the handler sees and returns raw bytes.
    return grpc.method_handlers_generic_handler(service, {method: grpc.unary_unary_rpc_method_handler(respond)})


async def serve(host: str, port: int, payload: bytes | None, grace_s: float, path: str = DEFAULT_METHOD) -> None:
    """Serve until SIGTERM or SIGINT, then stop within `grace_s` seconds."""
    await serve_plain(build_handler(payload, path), "echo", host, port, grace_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (default)")
    parser.add_argument(
        "--response-file",
        type=Path,
        help="serialized response message returned to every call; without it each request is echoed",
    )
    parser.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help=f"the full method path to serve (default {DEFAULT_METHOD})",
    )
    parser.add_argument("--grace", type=float, default=1.0, help="seconds to drain calls on shutdown (default 1)")
    args = parser.parse_args(argv)
    try:
        split_method(args.method)
    except ValueError as exc:
        parser.error(str(exc))
    payload = args.response_file.read_bytes() if args.response_file else None
    asyncio.run(serve(args.host, args.port, payload, args.grace, args.method))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
