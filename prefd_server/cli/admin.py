"""Commands that work on the database directly: migrate, purge, rotate-master-key; and token."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from prefd_server.cli.args import settings_from
from prefd_server.kernel.model import CallInfo
from prefd_server.logs import configure_logging
from prefd_server.settings import Settings

T = TypeVar("T")


def run_with_database(settings: Settings, work: Callable[[str], Awaitable[T]]) -> T:
    """Run `work(dsn)` against DATABASE_URL, or against the data directory's embedded PostgreSQL
    (started for the command and stopped after it)."""
    from prefd_server.app import prepare_database
    from prefd_server.embedded import EmbeddedPostgres

    async def run() -> T:
        embedded = None if settings.database_url else EmbeddedPostgres(settings.data_dir)
        try:
            return await work(await prepare_database(settings, embedded))
        finally:
            if embedded is not None:
                await embedded.stop()

    return asyncio.run(run())


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply pending migrations and exit."""
    from prefd_server.app import migrate_database

    settings = settings_from(args)
    configure_logging(settings.log_level, settings.log_format)
    applied = run_with_database(settings, migrate_database)
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print a bearer token signed with the configured key."""
    from prefd_server.rpc.auth import load_or_create_secret, mint_token
    from prefd_server.rpc.principal import Role

    settings = settings_from(args)
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
    import asyncpg

    from prefd_server.kernel.db import init_connection
    from prefd_server.kernel.feed_store import compact

    settings = settings_from(args)
    configure_logging(settings.log_level, settings.log_format)

    async def purge(dsn: str) -> tuple[int, Any]:
        conn = await asyncpg.connect(dsn)
        try:
            await init_connection(conn)
            async with conn.transaction():
                return await compact(conn, args.older_than, CallInfo(actor="prefd:purge"))
        finally:
            await conn.close()

    removed, through = run_with_database(settings, purge)
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
    from prefd_server.kernel.db import create_pool

    settings = settings_from(args)
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

    async def reseal(dsn: str) -> tuple[int, int]:
        pool = await create_pool(dsn, 1, 2, 0)
        try:
            return await reseal_all(pool, box)
        finally:
            await pool.close()

    resealed, current = run_with_database(settings, reseal)
    if file_ring:
        write_keyring(path, [new_key])
    print(f"re-encrypted {resealed} API keys under master key {box.current_id} ({current} already were)")
    if not file_ring and len(load_keyring(settings)) > 1:
        print("the other keys in PREFD_SECRET_KEY are no longer used and may be removed")
    return 0
