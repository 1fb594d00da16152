"""Shared helpers for building requests and reading rich error details."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from prefd.v1 import common_pb2, preferences_pb2


def tv(value: Any) -> common_pb2.TypedValue:
    """A TypedValue from a plain Python value."""
    if isinstance(value, bool):
        return common_pb2.TypedValue(bool_value=value)
    if isinstance(value, int):
        return common_pb2.TypedValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.TypedValue(double_value=value)
    if isinstance(value, str):
        return common_pb2.TypedValue(string_value=value)
    if isinstance(value, list):
        return common_pb2.TypedValue(string_list_value=common_pb2.StringList(values=value))
    out = common_pb2.TypedValue()
    out.json_value.update(value)
    return out


def py(value: common_pb2.TypedValue) -> Any:
    """A TypedValue as a plain Python value."""
    which = value.WhichOneof("kind")
    if which == "string_list_value":
        return list(value.string_list_value.values)
    if which == "json_value":
        from google.protobuf import json_format

        return json_format.MessageToDict(value.json_value)
    return getattr(value, which) if which else None


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
    """field -> description from the BadRequest detail of an error."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no rich status on {error.code()}: {error.details()}"
    out = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.update({v.field: v.description for v in bad.field_violations})
    return out


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of an error."""
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    raise AssertionError("no ErrorInfo detail")


async def eventually(check: Callable[[], Awaitable[bool]], deadline_s: float, interval_s: float = 0.02) -> None:
    """Wait until `check()` holds, for state in another process that offers no event; fails at the deadline."""
    async with asyncio.timeout(deadline_s):
        while not await check():  # noqa: ASYNC110  (the observed state lives outside this process)
            await asyncio.sleep(interval_s)
