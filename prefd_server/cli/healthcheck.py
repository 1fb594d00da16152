"""prefd healthcheck: ask a running server's grpc.health.v1 whether it is SERVING (the container's check)."""

from __future__ import annotations

import argparse
import sys

from prefd_server.settings import Settings


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when grpc.health.v1 reports SERVING for `args.service` (used by the Docker HEALTHCHECK).

    Over TLS when asked (`--tls` or any TLS option) or when the server's own settings configure TLS
    (the container's environment); the options default to PREFD_HEALTHCHECK_*. Without a CA, a
    PREFD_TLS_CERT_FILE that ends with its own trust anchor (self-signed) is trusted, under the name
    it carries when it does not carry --host."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from prefd.client.channel import TLSConfig
    from prefd_server.rpc.tls import self_anchored_names

    settings = Settings()
    port = args.port if args.port is not None else settings.port
    ca_file = args.ca_file or settings.healthcheck_ca_file
    cert_file = args.cert_file or settings.healthcheck_cert_file
    key_file = args.key_file or settings.healthcheck_key_file
    server_name = args.server_name or settings.healthcheck_server_name
    if ca_file is None and settings.tls_cert_file is not None:
        names = self_anchored_names(settings.tls_cert_file)
        if names is not None:
            ca_file = settings.tls_cert_file
            if server_name is None and names[0] and args.host not in (*names[0], *names[1]):
                server_name = names[0][0]
    target = f"{args.host}:{port}"
    if args.tls or settings.tls or any((ca_file, cert_file, key_file, server_name)):
        try:
            tls = TLSConfig.from_files(ca_file, cert_file, key_file, server_name)
        except ValueError as error:
            print(f"prefd healthcheck: {error}", file=sys.stderr)
            return 2
        channel = grpc.secure_channel(target, tls.credentials(), options=tls.options())
    else:
        channel = grpc.insecure_channel(target)
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as error:
        print(f"unhealthy: {error.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
