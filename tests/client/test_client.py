"""prefd.client over a real channel: calls carry the token and deadline; errors arrive typed."""

from __future__ import annotations

import grpc
import pytest

from prefd.client import AsyncPrefdClient, PrefdError, ValidationError
from prefd_server.app import App
from tests.helpers.auth import token, unique
from tests.helpers.requests import set_request, user


async def test_client_reads_and_raises_typed_errors(app: App) -> None:
    uid = unique("u")
    async with AsyncPrefdClient(f"127.0.0.1:{app.port}", token=lambda: token("user", uid)) as client:
        await client.set_preferences(set_request(user(uid), {"display.theme": "dark"}))
        reply = await client.get_effective(uid, key_prefixes=["display.theme"])
        assert reply.nested["display"]["theme"] == "dark"
        with pytest.raises(ValidationError) as bad:
            await client.set_preferences(set_request(user(uid), {"display.items_per_page": -1}))
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert list(bad.value.violations) == ["writes[0].value"]
        with pytest.raises(PrefdError) as denied:
            await client.get_effective(unique("someone-else"))
        assert (denied.value.code, denied.value.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")


async def test_bad_token_and_unreachable_target_fail_fast(app: App) -> None:
    async with AsyncPrefdClient(f"127.0.0.1:{app.port}", token="garbage") as client:
        with pytest.raises(PrefdError) as err:
            await client.get_effective("alice")
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with AsyncPrefdClient("127.0.0.1:1", token="t", timeout_s=2) as client:
        with pytest.raises(PrefdError) as err:
            await client.get_effective("alice")
        assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_the_client_has_a_stub_for_every_prefd_service() -> None:
    """Every generated RPC method of prefd.client reaches a stub (a new service needs its entry)."""
    import importlib
    import pkgutil

    import prefd.v1
    from prefd.client.channel import _STUBS

    services = {
        service.full_name
        for info in pkgutil.iter_modules(prefd.v1.__path__, "prefd.v1.")
        if info.name.endswith("_pb2")
        for service in importlib.import_module(info.name).DESCRIPTOR.services_by_name.values()
    }
    assert services == set(_STUBS)
