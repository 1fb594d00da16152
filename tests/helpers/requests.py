"""Shared helpers for building requests and reading rich error details."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from prefd.client import ValidationError, from_rpc_error
from prefd.v1 import common_pb2, preferences_pb2
from prefd_server.kernel.tokens import TokenKey
from prefd_server.rpc import convert


def tv(value: Any) -> common_pb2.TypedValue:
    """A TypedValue from a plain Python value."""
    return convert.value_to_pb(value)


def py(value: common_pb2.TypedValue) -> Any:
    """A TypedValue as a plain Python value (None when unset)."""
    return convert.value_from_pb(value, "value") if value.WhichOneof("kind") else None


GLOBAL = common_pb2.Scope(kind=common_pb2.SCOPE_KIND_GLOBAL)


def org(org_id: str) -> common_pb2.Scope:
    return common_pb2.Scope(kind=common_pb2.SCOPE_KIND_ORG, id=org_id)


def user(user_id: str) -> common_pb2.Scope:
    return common_pb2.Scope(kind=common_pb2.SCOPE_KIND_USER, id=user_id)


def set_request(
    scope: common_pb2.Scope, values: dict[str, Any], **kwargs: Any
) -> preferences_pb2.SetPreferencesRequest:
    return preferences_pb2.SetPreferencesRequest(
        scope=scope,
        writes=[preferences_pb2.PreferenceWrite(key=k, value=tv(v)) for k, v in values.items()],
        **kwargs,
    )


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """field -> description from the BadRequest detail of an INVALID_ARGUMENT error."""
    typed = from_rpc_error(error)
    assert isinstance(typed, ValidationError), f"{error.code()}: {error.details()}"
    return typed.violations


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of an error."""
    reason = from_rpc_error(error).reason
    assert reason, f"no ErrorInfo detail on {error.code()}: {error.details()}"
    return reason


async def eventually(check: Callable[[], Awaitable[bool]], deadline_s: float, interval_s: float = 0.02) -> None:
    """Wait until `check()` holds, for state in another process that offers no event; fails at the deadline."""
    async with asyncio.timeout(deadline_s):
        while not await check():  # noqa: ASYNC110  (the observed state lives outside this process)
            await asyncio.sleep(interval_s)


async def token_key(db: Any) -> TokenKey:
    """The key that seals this database's cursors and page tokens (as every server on it derives it)."""
    row = await db.fetchrow("SELECT id, pseudonym_key FROM installation")
    return TokenKey.derive(row["id"], row["pseudonym_key"])


async def effective_value(stub: Any, user_id: str, org_id: str, key: str, metadata: Any) -> Any:
    """The subject's effective value of one key (a preferences_pb2.EffectiveValue)."""
    reply = await stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(
            subject=common_pb2.Subject(user_id=user_id, org_id=org_id), key_prefixes=[key]
        ),
        metadata=metadata,
    )
    (found,) = [v for v in reply.values if v.key == key]
    return found
