"""prefd serve: one server process, or several sharing the port, and the quickstart it prints."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
from typing import Any

from prefd_server.cli.args import settings_from
from prefd_server.logs import configure_logging
from prefd_server.settings import Settings

DEV_TOKEN_TTL_S = 7 * 24 * 3600


def print_quickstart(settings: Settings, port: int, *, embedded: bool, announce: bool = True) -> None:
    """The admin token and a grpcurl line that works as printed (embedded mode, where prefd owns the secret)."""
    from prefd_server.rpc.auth import load_or_create_secret, mint_token
    from prefd_server.rpc.tls import grpcurl_flags

    if announce:
        print(f"prefd serving on port {port}", flush=True)
    if not embedded or settings.jwt_public_key or not settings.print_token:
        return
    token = mint_token(load_or_create_secret(settings), "ops", ["admin"], ttl_s=DEV_TOKEN_TTL_S)
    print("# an admin token, valid 7 days; paste this line into your shell:")
    print(f"export PREFD_TOKEN={token}")
    call = (
        '-H "authorization: Bearer $PREFD_TOKEN" '
        '-d \'{"subject": {"user_id": "alice", "org_id": "acme"}, "categories": ["display"]}\' '
        f"localhost:{port} prefd.v1.PreferencesService/GetEffectivePreferences"
    )
    flags = grpcurl_flags(settings)
    if flags is None:
        client = " -cert CLIENT.pem -key CLIENT.key" if settings.tls_client_ca_file else ""
        print("# the port speaks TLS: give grpcurl the CA that signed PREFD_TLS_CERT_FILE", end="")
        print(" and a client certificate that PREFD_TLS_CLIENT_CA_FILE signed" if client else "", end="")
        print(", for example:")
        print(f"# grpcurl -cacert CA.pem{client} {call}", flush=True)
        return
    print("# then, for example:")
    print(f"grpcurl {shlex.join(flags)} {call}", flush=True)


def check_serve_settings(settings: Settings) -> None:
    """Refuse to start (SettingsError naming the setting) before anything starts: the TLS files, and a
    signing key every replica shares when DATABASE_URL is set, and the OTEL_* settings of tracing (once,
    not in each of `--workers` processes)."""
    import os

    from prefd_server.rpc.auth import TokenVerifier
    from prefd_server.rpc.tls import server_credentials
    from prefd_server.rpc.tracing import tracing_settings

    server_credentials(settings)
    TokenVerifier(settings)
    tracing_settings(os.environ)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    configure_logging(settings.log_level, settings.log_format)
    check_serve_settings(settings)
    if settings.workers > 1:
        return serve_workers(settings)
    from prefd_server.app import serve_until_signalled

    asyncio.run(
        serve_until_signalled(
            settings, on_ready=lambda app: print_quickstart(settings, app.port, embedded=settings.embedded)
        )
    )
    return 0


def serve_workers(settings: Settings) -> int:
    """Fork `workers` server processes sharing one port (SO_REUSEPORT) before any gRPC object exists; with
    a metrics port, this process serves every worker's series on it (prefd_server/ops/metrics_merge.py)."""
    import os
    import signal
    import socket

    from prefd_server.embedded import EmbeddedPostgres
    from prefd_server.ops.metrics_merge import WORKER_METRICS_HOST, WorkerPorts, start_workers_endpoint
    from prefd_server.rpc.auth import load_or_create_secret

    embedded = None
    if settings.embedded:
        embedded = EmbeddedPostgres(settings.data_dir)
        # The workers see a DATABASE_URL; they share the data directory's signing secret.
        secret = None if settings.jwt_public_key else load_or_create_secret(settings)
        settings = settings.model_copy(
            update={"database_url": asyncio.run(embedded.start()), "jwt_secret": secret or settings.jwt_secret}
        )
    port = settings.port
    if port == 0:
        with socket.socket(socket.AF_INET6 if ":" in settings.host.strip("[]") else socket.AF_INET) as probe:
            probe.bind((settings.host.strip("[]"), 0))
            port = probe.getsockname()[1]
    worker_settings = settings.model_copy(update={"port": port, "print_token": False})
    announcements: tuple[int, int] | None = None
    if settings.metrics_port is not None:
        # Each worker serves its own series on loopback, on a port the kernel picks, and announces it here.
        worker_settings = worker_settings.model_copy(update={"metrics_port": 0, "metrics_host": WORKER_METRICS_HOST})
        announcements = os.pipe()
    children = []
    for index in range(settings.workers):
        pid = os.fork()
        if pid == 0:
            os._exit(run_worker(worker_settings, index, announcements))
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    metrics_server: Any = None
    worker_ports: WorkerPorts | None = None
    try:
        if announcements is not None and settings.metrics_port is not None:
            os.close(announcements[1])
            metrics_server, worker_ports = start_workers_endpoint(
                settings.metrics_port, settings.metrics_host, settings.workers, announcements[0]
            )
            print(f"prefd metrics on port {metrics_server.server_port} (every worker's series)", flush=True)
        print_quickstart(
            settings.model_copy(update={"port": port}), port, embedded=embedded is not None, announce=False
        )
    except BaseException:
        forward(signal.SIGTERM, None)
        raise
    finally:
        status = 0
        for child in children:
            _, code = os.waitpid(child, 0)
            status = status or os.waitstatus_to_exitcode(code)
        if metrics_server is not None:
            metrics_server.shutdown()
        if worker_ports is not None:
            worker_ports.close()
        if embedded is not None:
            asyncio.run(embedded.stop())
    return status


def run_worker(settings: Settings, index: int, announcements: tuple[int, int] | None) -> int:
    """One forked worker until SIGTERM: its exit code. With metrics on, it announces its endpoint's port
    through the pipe's write end."""
    import os

    from prefd_server.app import App, serve_until_signalled

    if announcements is not None:
        os.close(announcements[0])

    def ready(app: App) -> None:
        where = f", metrics on {settings.metrics_host}:{app.metrics_port}" if announcements is not None else ""
        print(f"prefd serving on port {app.port} (worker {index}, pid {os.getpid()}{where})", flush=True)
        if announcements is not None:
            from prefd_server.ops.metrics_merge import WorkerPorts

            WorkerPorts.announce(announcements[1], index, app.metrics_port)

    try:
        asyncio.run(serve_until_signalled(settings, on_ready=ready))
    except BaseException:
        logging.getLogger(__name__).exception("worker %d failed", index)
        return 1
    return 0
