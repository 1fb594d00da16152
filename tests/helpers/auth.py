"""Bearer tokens and call metadata for the test servers, and ids no other test uses."""

from __future__ import annotations

import uuid

from prefd_server.rpc.auth import mint_token
from tests.helpers.settings import SECRET


def token(
    role: str = "admin",
    sub: str = "ops",
    org: str = "",
    ttl_s: int = 600,
    secret: str = SECRET,
    permissions: tuple[str, ...] = (),
) -> str:
    return mint_token(secret, sub, [role], org=org, ttl_s=ttl_s, permissions=list(permissions))


def auth(
    role: str = "admin", sub: str = "ops", org: str = "", permissions: tuple[str, ...] = ()
) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a bearer token."""
    return (("authorization", f"Bearer {token(role, sub, org, permissions=permissions)}"),)


def unique(prefix: str = "t") -> str:
    """An id no other test uses."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"
