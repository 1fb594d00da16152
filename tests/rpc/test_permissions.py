"""The permission table: every RPC has an entry, and the middleware enforces it for every call."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

import prefd.v1
from prefd.v1 import ai_config_pb2, ai_config_pb2_grpc, audit_pb2, audit_pb2_grpc
from prefd_server.rpc.auth import TokenVerifier
from prefd_server.rpc.metrics import RpcMetrics
from prefd_server.rpc.middleware import Authenticator
from prefd_server.rpc.permissions import PERMISSIONS, Access, UnlistedMethod
from tests.helpers.auth import auth
from tests.helpers.handlers import HandlerRegistry
from tests.helpers.requests import error_reason
from tests.helpers.settings import make_settings


def _rpc_methods() -> set[str]:
    """`/package.Service/Method` of every method of every prefd.v1 service descriptor."""
    methods = set()
    for module_info in pkgutil.iter_modules(prefd.v1.__path__):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"prefd.v1.{module_info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            methods.update(f"/{service.full_name}/{method.name}" for method in service.methods)
    return methods


def test_every_rpc_has_exactly_one_decision() -> None:
    methods = _rpc_methods()
    assert len(methods) > 30  # the four services' methods were found
    assert sorted(methods - PERMISSIONS.keys()) == []
    assert sorted(PERMISSIONS.keys() - methods) == []  # no entry for an RPC that no longer exists


def test_an_rpc_missing_from_the_table_is_refused_at_start_up(tmp_path: Path) -> None:
    table = {method: access for method, access in PERMISSIONS.items() if not method.endswith("/GetChange")}
    authenticator = Authenticator(
        TokenVerifier(make_settings("", tmp_path)), RpcMetrics(CollectorRegistry()), permissions=table
    )
    server = HandlerRegistry()
    with pytest.raises(UnlistedMethod, match=r"/prefd\.v1\.AuditService/GetChange"):
        authenticator.add_service(
            server,  # type: ignore[arg-type]
            audit_pb2_grpc.add_AuditServiceServicer_to_server,
            audit_pb2_grpc.AuditServiceServicer(),
        )
    assert server.handlers == {}


class _OpenAudit(audit_pb2_grpc.AuditServiceServicer):
    """Answers without checking its caller: what a caller meets is the middleware's doing."""

    async def GetChange(self, request: audit_pb2.GetChangeRequest, context: Any) -> audit_pb2.GetChangeResponse:
        return audit_pb2.GetChangeResponse()

    async def ExportUserData(
        self, request: audit_pb2.ExportUserDataRequest, context: Any
    ) -> audit_pb2.ExportUserDataResponse:
        return audit_pb2.ExportUserDataResponse(json="{}")


class _OpenAIConfig(ai_config_pb2_grpc.AIConfigServiceServicer):
    """Answers RecordUsage without checking its caller."""

    async def RecordUsage(
        self, request: ai_config_pb2.RecordUsageRequest, context: Any
    ) -> ai_config_pb2.RecordUsageResponse:
        return ai_config_pb2.RecordUsageResponse(recorded=True)


@pytest.fixture
async def open_channel(tmp_path: Path) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a server whose handlers check nothing, behind the middleware."""
    assert PERMISSIONS["/prefd.v1.AuditService/GetChange"] is Access.ADMIN
    assert PERMISSIONS["/prefd.v1.AuditService/ExportUserData"] is Access.RESOURCE
    assert PERMISSIONS["/prefd.v1.AIConfigService/RecordUsage"] is Access.SERVICE
    authenticator = Authenticator(TokenVerifier(make_settings("", tmp_path)), RpcMetrics(CollectorRegistry()))
    server = grpc.aio.server()
    authenticator.add_service(server, audit_pb2_grpc.add_AuditServiceServicer_to_server, _OpenAudit())
    authenticator.add_service(server, ai_config_pb2_grpc.add_AIConfigServiceServicer_to_server, _OpenAIConfig())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def _refusal(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def test_the_middleware_enforces_the_table(open_channel: grpc.aio.Channel) -> None:
    audit = audit_pb2_grpc.AuditServiceStub(open_channel)
    ai = ai_config_pb2_grpc.AIConfigServiceStub(open_channel)
    as_user, as_service = auth("user", sub="alice"), auth("service", sub="billing")

    refused = await _refusal(audit.GetChange(audit_pb2.GetChangeRequest(id=1), metadata=as_user))
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.details() == "GetChange needs the admin role"
    assert error_reason(refused) == "PERMISSION_DENIED"
    refused = await _refusal(audit.GetChange(audit_pb2.GetChangeRequest(id=1), metadata=as_service))
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    await audit.GetChange(audit_pb2.GetChangeRequest(id=1), metadata=auth("admin"))

    refused = await _refusal(ai.RecordUsage(ai_config_pb2.RecordUsageRequest(), metadata=as_user))
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.details() == "RecordUsage needs the service or admin role"
    assert (await ai.RecordUsage(ai_config_pb2.RecordUsageRequest(), metadata=as_service)).recorded
    assert (await ai.RecordUsage(ai_config_pb2.RecordUsageRequest(), metadata=auth("admin"))).recorded

    # RESOURCE: the middleware lets any authenticated caller through to the handler.
    assert (await audit.ExportUserData(audit_pb2.ExportUserDataRequest(), metadata=as_user)).json == "{}"
    refused = await _refusal(audit.ExportUserData(audit_pb2.ExportUserDataRequest()))
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_malformed_request_is_invalid_before_it_is_refused(open_channel: grpc.aio.Channel) -> None:
    """The request-limits parse runs before the table's check, as it ran before the handlers' checks."""
    get_change = open_channel.unary_unary("/prefd.v1.AuditService/GetChange")
    refused = await _refusal(get_change(b"\xff\xff\xff", metadata=auth("user", sub="alice")))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid GetChange request" in refused.details()
