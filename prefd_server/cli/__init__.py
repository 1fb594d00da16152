"""The prefd command: serve, migrate, token, purge, rotate-master-key, rebuild-statistics, healthcheck."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from prefd_server.cli.admin import cmd_migrate, cmd_purge, cmd_rotate_master_key, cmd_token, parse_duration
from prefd_server.cli.args import invalid_settings_message
from prefd_server.cli.healthcheck import cmd_healthcheck
from prefd_server.cli.serve import cmd_serve
from prefd_server.cli.statistics import cmd_rebuild_statistics
from prefd_server.settings import Settings, SettingsError


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per command."""
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

    stats = sub.add_parser("rebuild-statistics", help="forget every statistic and count the change feed again")
    stats.add_argument("--data-dir", type=Path, help="as for serve")
    stats.set_defaults(func=cmd_rebuild_statistics)

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


def main(argv: list[str] | None = None) -> int:
    """Run the command named on the command line; its exit status."""
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except SettingsError as error:
        print(f"prefd: {error}", file=sys.stderr)
        return 2
    except ValidationError as error:
        if error.title != Settings.__name__:
            raise
        print(invalid_settings_message(error), file=sys.stderr)
        return 2
    return result
