"""Structured logs: JSON lines carrying the request id that the call returns, and no secret anywhere."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.app import App
from prefd_server.logs import log_handler
from prefd_server.preferences.model import Definition
from prefd_server.preferences.reads import PreferenceReader
from prefd_server.preferences.service import PreferencesService
from prefd_server.rpc.auth import TokenVerifier
from prefd_server.rpc.metrics import RpcMetrics
from prefd_server.rpc.middleware import Authenticator
from tests.helpers.aiconfig import create_config
from tests.helpers.auth import auth, token, unique
from tests.helpers.handlers import HandlerRegistry
from tests.helpers.metrics import scrape
from tests.helpers.requests import error_reason, eventually, set_request, user
from tests.helpers.settings import make_settings

PHONE = "+15550001234567"
API_KEY = "sk-logcheck-9f8e7d6c5b4a"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Everything logged at DEBUG while the test runs, as the server's JSON handler writes it."""
    stream = io.StringIO()
    handler = log_handler("json", stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _trailing_request_id(call_metadata: tuple[tuple[str, str], ...] | None) -> str:
    return dict(call_metadata or ()).get("x-request-id", "")


async def test_json_lines_carry_the_request_id_and_no_secrets(stub, ai_stub, captured) -> None:
    uid = unique("u")
    bearer = token("user", uid)
    metadata = (("authorization", f"Bearer {bearer}"), ("x-request-id", "req-logs-0001"))

    call = stub.SetPreferences(set_request(user(uid), {"notifications.sms.phone_number": PHONE}), metadata=metadata)
    await call
    assert _trailing_request_id(await call.trailing_metadata()) == "req-logs-0001"

    # A refused write of a sensitive value (too long) and an unauthenticated call: ids generated.
    refused = stub.SetPreferences(
        set_request(user(uid), {"notifications.sms.phone_number": PHONE * 3}),
        metadata=(("authorization", f"Bearer {bearer}"),),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await refused
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    refused_id = _trailing_request_id(err.value.trailing_metadata())
    anonymous = stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=uid))
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await anonymous
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    anonymous_id = _trailing_request_id(err.value.trailing_metadata())
    assert refused_id and anonymous_id and len({refused_id, anonymous_id, "req-logs-0001"}) == 3

    await create_config(ai_stub, metadata=auth("admin"), user_id=uid, keys={"primary": API_KEY})

    text = captured.getvalue()
    records = [json.loads(line) for line in text.splitlines()]
    assert records and all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    by_request = {record["request_id"]: record for record in records if record.get("request_id")}
    assert by_request["req-logs-0001"]["rpc"] == "/prefd.v1.PreferencesService/SetPreferences"
    assert "INVALID_ARGUMENT" in by_request[refused_id]["message"]
    assert "UNAUTHENTICATED" in by_request[anonymous_id]["message"]
    for secret in (PHONE, API_KEY, bearer, API_KEY[-12:]):
        assert secret not in text


def _records(captured: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in captured.getvalue().splitlines()]


async def test_an_unexpected_error_is_internal_with_the_request_id_and_logged_once(stub, captured, monkeypatch) -> None:
    async def broken(self: PreferenceReader, key: str) -> Definition:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(PreferenceReader, "definition", broken)
    metadata = (*auth("admin"), ("x-request-id", "req-internal-0001"))
    call = stub.GetDefinition(preferences_pb2.GetDefinitionRequest(key="display.theme"), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "req-internal-0001" in err.value.details()
    assert "division by zero" not in err.value.details()
    assert error_reason(err.value) == "INTERNAL"
    assert _trailing_request_id(err.value.trailing_metadata()) == "req-internal-0001"
    errors = [record for record in _records(captured) if record["level"] == "ERROR"]
    assert len(errors) == 1, errors
    assert errors[0]["request_id"] == "req-internal-0001"
    assert errors[0]["rpc"] == "/prefd.v1.PreferencesService/GetDefinition"
    assert "Traceback" in errors[0]["exc_info"] and "ZeroDivisionError" in errors[0]["exc_info"]


async def test_an_unexpected_error_in_a_stream_is_internal_with_the_request_id(stub, captured, monkeypatch) -> None:
    def broken(self: PreferencesService, request: Any, principal: Any) -> Any:
        raise RuntimeError("not expected")

    monkeypatch.setattr(PreferencesService, "_watch_target", broken)
    metadata = (*auth("admin"), ("x-request-id", "req-internal-0002"))
    watch = stub.WatchPreferences(
        preferences_pb2.WatchPreferencesRequest(subject=common_pb2.Subject(user_id=unique("u"))), metadata=metadata
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with asyncio.timeout(10):
            await watch.read()
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "req-internal-0002" in err.value.details()
    assert _trailing_request_id(err.value.trailing_metadata()) == "req-internal-0002"
    errors = [record for record in _records(captured) if record["level"] == "ERROR"]
    assert [e["request_id"] for e in errors] == ["req-internal-0002"]
    assert "RuntimeError" in errors[0]["exc_info"]


async def test_a_watch_its_client_closes_is_cancelled_not_an_error(database_url, tmp_path, captured) -> None:
    labels = "method=WatchPreferences,service=prefd.v1.PreferencesService"
    async with App(make_settings(database_url, tmp_path, metrics_port=0, metrics_host="127.0.0.1")) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
            watch = stub.WatchPreferences(
                preferences_pb2.WatchPreferencesRequest(subject=common_pb2.Subject(user_id=unique("u"))),
                metadata=auth("admin"),
            )
            assert (await watch.read()).HasField("started")
            watch.cancel()

            async def counted() -> bool:
                samples = await asyncio.to_thread(scrape, app.metrics_port)
                return samples.get(f"prefd_rpc_calls_total{{code=CANCELLED,{labels}}}", 0) == 1

            await eventually(counted, 5)
            samples = await asyncio.to_thread(scrape, app.metrics_port)
    assert not [key for key in samples if key.startswith("prefd_rpc_calls_total") and "code=UNKNOWN" in key]
    assert not [record for record in _records(captured) if record["level"] == "ERROR"]


class _Flood(preferences_pb2_grpc.PreferencesServiceServicer):
    """Answers WatchPreferences with messages for as long as it is read."""

    async def WatchPreferences(
        self, request: preferences_pb2.WatchPreferencesRequest, context: Any
    ) -> AsyncIterator[preferences_pb2.WatchPreferencesResponse]:
        while True:
            yield preferences_pb2.WatchPreferencesResponse(progress=common_pb2.WatchProgress())


class _Context:
    """The parts of a grpc.aio servicer context the wrapper uses, for a call without a deadline."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token('admin')}"), ("x-request-id", "req-closed-0001"))

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def time_remaining(self) -> float | None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


async def test_a_stream_closed_while_it_sends_is_cancelled_not_an_error(tmp_path, captured) -> None:
    """A client that goes away while gRPC is sending leaves the stream suspended where it yields;
    gRPC then closes it (GeneratorExit there): the end of the call, not an error."""
    registry = CollectorRegistry()
    authenticator = Authenticator(TokenVerifier(make_settings("", tmp_path)), RpcMetrics(registry))
    server = HandlerRegistry()
    authenticator.add_service(
        server,  # type: ignore[arg-type]
        preferences_pb2_grpc.add_PreferencesServiceServicer_to_server,
        _Flood(),
    )
    request = preferences_pb2.WatchPreferencesRequest(subject=common_pb2.Subject(user_id="u1"))
    stream = server.handlers["WatchPreferences"].unary_stream(request.SerializeToString(), _Context())
    assert (await stream.__anext__()).HasField("progress")
    await stream.aclose()
    labels = {"service": "prefd.v1.PreferencesService", "method": "WatchPreferences"}
    assert registry.get_sample_value("prefd_rpc_calls_total", {**labels, "code": "CANCELLED"}) == 1
    assert registry.get_sample_value("prefd_rpc_calls_total", {**labels, "code": "UNKNOWN"}) is None
    assert not [record for record in _records(captured) if record["level"] == "ERROR"]
