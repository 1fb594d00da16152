"""The prefd command: serve, migrate, token, purge, healthcheck."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from prefd_server.kernel.model import CallInfo
from prefd_server.logs import configure_logging
from prefd_server.settings import Settings, SettingsError

DEV_TOKEN_TTL_S = 7 * 24 * 3600


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    if getattr(args, "data_dir", None) is not None:
        overrides["data_dir"] = args.data_dir
    if getattr(args, "host", None) is not None:
        overrides["host"] = args.host
    if getattr(args, "workers", None) is not None:
        overrides["workers"] = args.workers
    return Settings(**overrides)


def _print_quickstart(settings: Settings, port: int, *, embedded: bool, announce: bool = True) -> None:
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


def _check_serve_settings(settings: Settings) -> None:
    """Refuse to start (SettingsError naming the setting) before anything starts: the TLS files, and a
    signing key every replica shares when DATABASE_URL is set."""
    from prefd_server.rpc.auth import TokenVerifier
    from prefd_server.rpc.tls import server_credentials

    server_credentials(settings)
    TokenVerifier(settings)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    _check_serve_settings(settings)
    if settings.workers > 1:
        return serve_workers(settings)
    from prefd_server.app import serve_until_signalled

    asyncio.run(
        serve_until_signalled(
            settings, on_ready=lambda app: _print_quickstart(settings, app.port, embedded=settings.embedded)
        )
    )
    return 0


def serve_workers(settings: Settings) -> int:
    """Fork `workers` server processes sharing one port (SO_REUSEPORT) before any gRPC object exists."""
    import os
    import signal
    import socket

    from prefd_server.embedded import EmbeddedPostgres
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
    children = []
    for index in range(settings.workers):
        if settings.metrics_port:
            # Each worker exposes its own metrics on consecutive ports.
            worker_settings = worker_settings.model_copy(update={"metrics_port": settings.metrics_port + index})
        pid = os.fork()
        if pid == 0:
            from prefd_server.app import serve_until_signalled

            code = 0
            try:
                asyncio.run(
                    serve_until_signalled(
                        worker_settings,
                        on_ready=lambda app, i=index: print(
                            f"prefd serving on port {app.port} (worker {i}, pid {os.getpid()})", flush=True
                        ),
                    )
                )
            except BaseException:
                logging.getLogger(__name__).exception("worker %d failed", index)
                code = 1
            os._exit(code)
        children.append(pid)
    _print_quickstart(settings.model_copy(update={"port": port}), port, embedded=embedded is not None, announce=False)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        status = status or os.waitstatus_to_exitcode(code)
    if embedded is not None:
        asyncio.run(embedded.stop())
    return status


def cmd_migrate(args: argparse.Namespace) -> int:
    from prefd_server.app import migrate_database, prepare_database
    from prefd_server.embedded import EmbeddedPostgres

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)

    async def run() -> list[str]:
        embedded = None if settings.database_url else EmbeddedPostgres(settings.data_dir)
        try:
            return await migrate_database(await prepare_database(settings, embedded))
        finally:
            if embedded is not None:
                await embedded.stop()

    applied = asyncio.run(run())
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from prefd_server.rpc.auth import Role, load_or_create_secret, mint_token

    settings = _settings(args)
    for role in args.role:
        if role not in Role._value2member_map_:
            print(f"unknown role {role!r}; use user, service or admin", file=sys.stderr)
            return 2
    if args.private_key:
        key = Path(args.private_key).read_text()
        algorithm = args.algorithm
    else:
        key = load_or_create_secret(settings)
        algorithm = "HS256"
    print(
        mint_token(
            key,
            args.sub,
            args.role,
            org=args.org,
            ttl_s=args.ttl,
            algorithm=algorithm,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            permissions=args.permission,
        )
    )
    return 0


def parse_duration(text: str) -> timedelta:
    """'90d', '12h', '30m', '45s' (or a plain number of seconds) as a timedelta."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            return timedelta(seconds=float(text[:-1]) * units[text[-1]])
        return timedelta(seconds=float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90d, 12h, 30m)") from exc


def cmd_purge(args: argparse.Namespace) -> int:
    """Remove change rows older than --older-than, keeping the latest change of every key."""
    from prefd_server.app import prepare_database
    from prefd_server.embedded import EmbeddedPostgres
    from prefd_server.kernel.db import init_connection
    from prefd_server.kernel.feed_store import compact

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)

    async def run() -> tuple[int, Any]:
        embedded = None if settings.database_url else EmbeddedPostgres(settings.data_dir)
        try:
            import asyncpg

            conn = await asyncpg.connect(await prepare_database(settings, embedded))
            try:
                await init_connection(conn)
                async with conn.transaction():
                    return await compact(conn, args.older_than, CallInfo(actor="prefd:purge"))
            finally:
                await conn.close()
        finally:
            if embedded is not None:
                await embedded.stop()

    removed, through = asyncio.run(run())
    print(
        f"removed {removed} change rows"
        + (f" (through feed position {through.xid}.{through.change_id})" if through else "")
    )
    return 0


def cmd_rotate_master_key(args: argparse.Namespace) -> int:
    """Re-encrypt every stored API key under the current master key.

    With PREFD_SECRET_KEY (new key first, old ones after) it re-encrypts under the first key; in
    embedded mode it creates a new key in the data directory first and drops the old one after.
    """
    import secrets as token_source

    from prefd_server.aiconfig.secretbox import KEY_BYTES, SecretBox, keyring_path, load_keyring, write_keyring
    from prefd_server.aiconfig.writes import reseal_all
    from prefd_server.app import prepare_database
    from prefd_server.embedded import EmbeddedPostgres
    from prefd_server.kernel.db import create_pool

    settings = _settings(args)
    configure_logging(settings.log_level, settings.log_format)
    file_ring = settings.secret_key is None and settings.embedded
    if not file_ring and settings.secret_key is None:
        print("no master key configured: set PREFD_SECRET_KEY (new key first, then the old ones)", file=sys.stderr)
        return 2
    if file_ring:
        path = keyring_path(settings)
        old_keys = load_keyring(settings)
        new_key = token_source.token_bytes(KEY_BYTES)
        write_keyring(path, [new_key, *old_keys])
    box = SecretBox(settings)

    async def run() -> tuple[int, int]:
        embedded = None if settings.database_url else EmbeddedPostgres(settings.data_dir)
        try:
            pool = await create_pool(await prepare_database(settings, embedded), 1, 2, 0)
            try:
                return await reseal_all(pool, box)
            finally:
                await pool.close()
        finally:
            if embedded is not None:
                await embedded.stop()

    resealed, current = asyncio.run(run())
    if file_ring:
        write_keyring(path, [new_key])
    print(f"re-encrypted {resealed} API keys under master key {box.current_id} ({current} already were)")
    if not file_ring and len(load_keyring(settings)) > 1:
        print("the other keys in PREFD_SECRET_KEY are no longer used and may be removed")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefd", description="prefd: preferences and configuration over gRPC")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--port", type=int, help="port to listen on (PREFD_PORT, default 50051)")
    serve.add_argument("--host", help="address to bind (PREFD_HOST, default [::])")
    serve.add_argument("--data-dir", type=Path, help="embedded database and secrets (PREFD_DATA_DIR, default ./.prefd)")
    serve.add_argument("--workers", type=int, help="server processes sharing the port (PREFD_WORKERS, default 1)")
    serve.set_defaults(func=cmd_serve)

    mig = sub.add_parser("migrate", help="apply pending database migrations and exit")
    mig.add_argument("--data-dir", type=Path, help="as for serve")
    mig.set_defaults(func=cmd_migrate)

    tok = sub.add_parser("token", help="mint a bearer token from the configured signing secret")
    tok.add_argument("--role", action="append", required=True, help="user, service or admin (repeatable)")
    tok.add_argument("--sub", required=True, help="the token subject (user id or service name)")
    tok.add_argument("--org", default="", help="the subject's org id")
    tok.add_argument(
        "--permission", action="append", default=[], help="extra permission, e.g. ai:secrets:read (repeatable)"
    )
    tok.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    tok.add_argument("--data-dir", type=Path, help="where the signing secret lives (as for serve)")
    tok.add_argument("--private-key", help="PEM private key file, to sign RS256/ES256 instead of HS256")
    tok.add_argument("--algorithm", default="RS256", choices=["RS256", "ES256"], help="with --private-key")
    tok.set_defaults(func=cmd_token)

    purge = sub.add_parser("purge", help="remove old change history (keeps each key's latest change)")
    purge.add_argument("--older-than", type=parse_duration, required=True, help="e.g. 90d, 12h")
    purge.add_argument("--data-dir", type=Path, help="as for serve")
    purge.set_defaults(func=cmd_purge)

    rotate = sub.add_parser("rotate-master-key", help="re-encrypt every stored API key under the current master key")
    rotate.add_argument("--data-dir", type=Path, help="as for serve")
    rotate.set_defaults(func=cmd_rotate_master_key)

    hc = sub.add_parser("healthcheck", help="exit 0 if the local server reports SERVING")
    hc.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    hc.add_argument("--port", type=int, help="server port (PREFD_PORT, default 50051)")
    hc.add_argument("--service", default="", help="service name to check (default: the whole server)")
    hc.add_argument("--timeout", type=float, default=3.0, help="seconds to wait (default 3)")
    hc.add_argument("--tls", action="store_true", help="connect over TLS (implied by the options below)")
    hc.add_argument("--ca-file", type=Path, help="PEM CA to trust (PREFD_HEALTHCHECK_CA_FILE; default: system roots)")
    hc.add_argument("--cert-file", type=Path, help="PEM client certificate under mTLS (PREFD_HEALTHCHECK_CERT_FILE)")
    hc.add_argument("--key-file", type=Path, help="its PEM private key (PREFD_HEALTHCHECK_KEY_FILE)")
    hc.add_argument(
        "--server-name", help="name the server's certificate carries, if not --host (PREFD_HEALTHCHECK_SERVER_NAME)"
    )
    hc.set_defaults(func=cmd_healthcheck)
    return parser


def _invalid_settings(error: ValidationError) -> str:
    """One line per invalid setting, named as in the environment; never the value (it may be a secret)."""
    lines = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        name = field if field.isupper() else f"PREFD_{field.upper()}"
        lines.append(f"prefd: {name}: {problem['msg']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except SettingsError as error:
        print(f"prefd: {error}", file=sys.stderr)
        return 2
    except ValidationError as error:
        if error.title != Settings.__name__:
            raise
        print(_invalid_settings(error), file=sys.stderr)
        return 2
    return result
