"""The authentication and permission matrix."""

from __future__ import annotations

import time

import grpc
import jwt
import pytest

from prefd.v1 import common_pb2, preferences_pb2
from tests.helpers.auth import token, unique
from tests.helpers.requests import GLOBAL, error_reason, org, py, set_request, user
from tests.helpers.settings import SECRET


def bearer(value: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {value}"),)


def effective(user_id: str, org_id: str = "") -> preferences_pb2.GetEffectivePreferencesRequest:
    return preferences_pb2.GetEffectivePreferencesRequest(
        subject=common_pb2.Subject(user_id=user_id, org_id=org_id), key_prefixes=["display.theme"]
    )


async def expect(code: grpc.StatusCode, call) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()


async def test_tokens_must_be_present_valid_and_current(stub):
    request = effective("alice")
    await expect(grpc.StatusCode.UNAUTHENTICATED, stub.GetEffectivePreferences(request))
    await expect(grpc.StatusCode.UNAUTHENTICATED, stub.GetEffectivePreferences(request, metadata=bearer("")))
    await expect(grpc.StatusCode.UNAUTHENTICATED, stub.GetEffectivePreferences(request, metadata=bearer("not.a.jwt")))
    forged = token("admin", secret="some-other-secret-" + "y" * 32)
    await expect(grpc.StatusCode.UNAUTHENTICATED, stub.GetEffectivePreferences(request, metadata=bearer(forged)))
    expired = token("admin", ttl_s=-120)
    await expect(grpc.StatusCode.UNAUTHENTICATED, stub.GetEffectivePreferences(request, metadata=bearer(expired)))
    no_role = token("janitor")
    await expect(grpc.StatusCode.UNAUTHENTICATED, stub.GetEffectivePreferences(request, metadata=bearer(no_role)))
    basic = (("authorization", f"Basic {token('admin')}"),)
    await expect(grpc.StatusCode.UNAUTHENTICATED, stub.GetEffectivePreferences(request, metadata=basic))
    ok = await stub.GetEffectivePreferences(request, metadata=bearer(token("admin", secret=SECRET)))
    assert ok.values[0].key == "display.theme"


async def test_user_reads_and_writes_only_itself(stub, db):
    alice, bob, acme = unique("alice"), unique("bob"), unique("acme")
    as_alice = bearer(token("user", alice, org=acme))
    mine = await stub.GetEffectivePreferences(effective(alice), metadata=as_alice)
    assert mine.values
    await stub.GetEffectivePreferences(effective(alice, acme), metadata=as_alice)
    await expect(grpc.StatusCode.PERMISSION_DENIED, stub.GetEffectivePreferences(effective(bob), metadata=as_alice))
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        stub.GetEffectivePreferences(effective(alice, unique("other")), metadata=as_alice),
    )
    reply = await stub.SetPreferences(set_request(user(alice), {"display.theme": "dark"}), metadata=as_alice)
    assert len(reply.changes) == 1
    for scope in (user(bob), org(acme), GLOBAL):
        await expect(
            grpc.StatusCode.PERMISSION_DENIED,
            stub.SetPreferences(set_request(scope, {"display.theme": "dark"}), metadata=as_alice),
        )
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        stub.ListPreferences(preferences_pb2.ListPreferencesRequest(scope=user(bob)), metadata=as_alice),
    )
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        stub.BatchGetEffectivePreferences(
            preferences_pb2.BatchGetEffectivePreferencesRequest(
                subjects=[common_pb2.Subject(user_id=alice), common_pb2.Subject(user_id=bob)]
            ),
            metadata=as_alice,
        ),
    )
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        stub.CreateDefinition(preferences_pb2.CreateDefinitionRequest(), metadata=as_alice),
    )
    assert await db.fetchval("SELECT count(*) FROM changes WHERE scope_id IN ($1, $2)", bob, acme) == 0


async def test_service_reads_any_subject_and_writes_nothing(stub, db):
    as_service = bearer(token("service", "trading-engine"))
    uid = unique("u")
    reply = await stub.GetEffectivePreferences(effective(uid, unique("o")), metadata=as_service)
    assert reply.values
    for scope in (user(uid), org(unique("o")), GLOBAL):
        await expect(
            grpc.StatusCode.PERMISSION_DENIED,
            stub.SetPreferences(set_request(scope, {"display.theme": "dark"}), metadata=as_service),
        )
    await expect(
        grpc.StatusCode.PERMISSION_DENIED,
        stub.ResetPreferences(preferences_pb2.ResetPreferencesRequest(scope=user(uid)), metadata=as_service),
    )
    assert await db.fetchval("SELECT count(*) FROM changes WHERE scope_id = $1", uid) == 0


async def test_admin_writes_global_and_org(stub):
    as_admin = bearer(token("admin"))
    oid = unique("o")
    reply = await stub.SetPreferences(set_request(org(oid), {"display.theme": "dark"}), metadata=as_admin)
    assert reply.changes[0].new_version == 1


async def test_request_id_is_recorded_and_returned(stub, db):
    uid = unique("u")
    call = stub.SetPreferences(
        set_request(user(uid), {"display.theme": "dark"}),
        metadata=(*bearer(token("admin")), ("x-request-id", "req-42")),
    )
    await call
    trailers = dict(await call.trailing_metadata())
    assert trailers["x-request-id"] == "req-42"
    assert await db.fetchval("SELECT request_id FROM changes WHERE scope_id = $1", uid) == "req-42"


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_public_key_tokens(database_url, tmp_path, algorithm) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from prefd.v1 import preferences_pb2_grpc
    from prefd_server.app import App
    from prefd_server.rpc.auth import mint_token
    from tests.helpers.settings import make_settings

    key = rsa.generate_private_key(65537, 2048) if algorithm == "RS256" else ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    settings = make_settings(database_url, tmp_path).model_copy(
        update={"jwt_secret": None, "jwt_public_key": public_pem, "jwt_algorithm": algorithm}
    )
    async with App(settings) as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
        signed = mint_token(private_pem, "svc", ["service"], algorithm=algorithm)
        reply = await stub.GetEffectivePreferences(effective("anyone"), metadata=bearer(signed))
        assert reply.values
        await expect(
            grpc.StatusCode.UNAUTHENTICATED, stub.GetEffectivePreferences(effective("anyone"), metadata=bearer(token()))
        )


def signed(**claims: object) -> str:
    """A token signed with the test secret: an admin token for `ops` with `claims` replacing its own."""
    now = int(time.time())
    return jwt.encode({"sub": "ops", "roles": ["admin"], "iat": now, "exp": now + 600, **claims}, SECRET, "HS256")


@pytest.mark.parametrize(
    ("claim", "claims"),
    [
        ("sub", {"sub": 5}),
        ("sub", {"sub": ""}),
        ("sub", {"sub": None}),
        ("sub", {"sub": ["ops"]}),
        ("sub", {"sub": "ops\x00admin"}),
        ("sub", {"sub": "ops\nadmin"}),
        ("sub", {"sub": "o" * 129}),
        ("roles", {"roles": 5}),
        ("roles", {"roles": None}),
        ("roles", {"roles": [["admin"]]}),
        ("roles", {"roles": {"admin": 1}}),
        ("roles", {"roles": ["admin", 1]}),
        ("permissions", {"permissions": 5}),
        ("permissions", {"permissions": "ai:secrets:read"}),
        ("permissions", {"permissions": [1]}),
        ("permissions", {"permissions": {"ai:secrets:read": True}}),
        ("org", {"org": 5}),
        ("org", {"org": None}),
        ("org", {"org": ["acme"]}),
        ("org", {"org": "acme\x00"}),
        ("org", {"org": "a" * 129}),
    ],
    ids=lambda value: repr(value)[:40] if isinstance(value, dict) else str(value),
)
async def test_signed_tokens_with_ill_typed_claims_are_unauthenticated(stub, db, claim, claims):
    uid, oid = unique("u"), unique("o")
    metadata = bearer(signed(**claims))
    for call in (
        stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=metadata),
        stub.SetPreferences(set_request(org(oid), {"display.theme": "dark"}), metadata=metadata),
        stub.GetEffectivePreferences(effective(uid), metadata=metadata),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
        assert f'"{claim}"' in err.value.details() or f"'{claim}'" in err.value.details(), err.value.details()
        assert error_reason(err.value) == "UNAUTHENTICATED"
    assert await db.fetchval("SELECT count(*) FROM changes WHERE scope_id IN ($1, $2)", uid, oid) == 0


async def test_well_typed_claims_still_authenticate(stub):
    uid, acme = unique("u"), unique("acme")
    reply = await stub.SetPreferences(
        set_request(user(uid), {"display.theme": "dark"}), metadata=bearer(signed(roles="admin", org=acme))
    )
    assert reply.changes[0].new_version == 1
    as_user = bearer(signed(sub=uid, roles=["user", "auditor"], org=acme, permissions=["ai:secrets:read"]))
    mine = await stub.GetEffectivePreferences(effective(uid, acme), metadata=as_user)
    assert py(mine.values[0].value) == "dark"
    other = effective(unique("u"))
    await expect(grpc.StatusCode.PERMISSION_DENIED, stub.GetEffectivePreferences(other, metadata=as_user))
