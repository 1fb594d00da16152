"""Structured logs: JSON lines carrying the request id that the call returns, and no secret anywhere."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import grpc
import pytest

from prefd.v1 import common_pb2, preferences_pb2
from server.logs import log_handler
from tests.conftest import auth, token, unique
from tests.helpers import set_request, user
from tests.test_ai_config import create_config

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


async def test_json_lines_carry_the_request_id_and_no_secrets(stub, ai_stub, captured) -> None:  # type: ignore[no-untyped-def]
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
