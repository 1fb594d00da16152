"""The JWT secret prefd is started with, the tokens minted from it, and the metadata that carries one."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from prefd_server.rpc.auth import mint_token

TOKEN_TTL_S = 12 * 3600


@dataclass(frozen=True)
class Tokens:
    """A fresh signing secret and an admin and a service token minted from it."""

    secret: str
    admin: str
    service: str

    @classmethod
    def new(cls) -> Tokens:
        """A new random secret and its tokens (valid for TOKEN_TTL_S)."""
        secret = secrets.token_urlsafe(32)
        return cls(
            secret,
            admin=mint_token(secret, "bench-admin", ["admin"], ttl_s=TOKEN_TTL_S),
            service=mint_token(secret, "bench-service", ["service"], ttl_s=TOKEN_TTL_S),
        )


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The bearer-token metadata prefd needs (none without a token, as for the baseline servers)."""
    return (("authorization", f"Bearer {token}"),) if token else ()
