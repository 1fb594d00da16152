"""AIConfigService API keys: masked in every response, clear only for services granted ai:secrets:read,
never in clear at rest (tables, change rows, a full dump) nor in the logs."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pgserver
import pytest
from google.protobuf import field_mask_pb2

from prefd.v1 import ai_config_pb2 as ai
from prefd.v1 import ai_config_pb2_grpc, common_pb2
from prefd_server.app import App
from tests.helpers.aiconfig import (
    ADMIN,
    config_message,
    config_source,
    configuration,
    create_config,
    get_effective,
    masked,
    new_key,
    provenance_tuple,
    row_counts,
)
from tests.helpers.auth import auth, unique
from tests.helpers.requests import field_violations
from tests.helpers.settings import make_settings

READ_SECRETS = ("ai:secrets:read",)
PG_DUMP = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"


async def next_config_change(call: Any, deadline_s: float = 10) -> ai.AIConfigChanged:
    async with asyncio.timeout(deadline_s):
        while True:
            message = await call.read()
            assert message is not grpc.aio.EOF, "stream ended"
            if message.HasField("config_changed"):
                return message.config_changed


def keys_of(config: ai.AIConfig | ai.AIConfiguration) -> tuple[str, str, int]:
    conf = config.configuration if isinstance(config, ai.AIConfig) else config
    return (conf.api_keys.primary, conf.api_keys.secondary, conf.api_keys.key_version)


async def test_keys_are_masked_for_everyone_but_services_granted_secret_reads(ai_stub, app, db, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("prefd_server", "grpc", "asyncpg", "redis"):
        caplog.set_level(logging.DEBUG, logger=name)
    uid, oid = unique("u"), unique("o")
    first, second = new_key(), new_key()
    as_user = auth("user", uid, oid)
    clear = auth("service", "generator", permissions=READ_SECRETS)
    watch_masked = ai_stub.WatchAIConfig(
        ai.WatchAIConfigRequest(subject=common_pb2.Subject(user_id=uid, org_id=oid)), metadata=auth("service", "svc")
    )
    watch_clear = ai_stub.WatchAIConfig(
        ai.WatchAIConfigRequest(subject=common_pb2.Subject(user_id=uid, org_id=oid)), metadata=clear
    )
    assert (await watch_masked.read()).HasField("started") and (await watch_clear.read()).HasField("started")

    created = await create_config(
        ai_stub,
        as_user,
        user_id=uid,
        keys={"primary": first},
        values={"api_keys.rotation_schedule": "monthly"},
    )
    assert keys_of(created) == (masked(first), "", 1)
    assert created.configuration.api_keys.rotation_schedule == ai.ROTATION_SCHEDULE_MONTHLY
    rotated = (
        await ai_stub.RotateAPIKey(
            ai.RotateAPIKeyRequest(id=created.id, new_key=second, reason="scheduled"), metadata=as_user
        )
    ).config
    assert rotated.version == 2
    assert keys_of(rotated) == (masked(second), masked(first), 2)
    updated = (
        await ai_stub.UpdateAIConfig(
            ai.UpdateAIConfigRequest(
                config=ai.AIConfig(id=created.id, configuration=configuration({"model.temperature": 0.3}))
            ),
            metadata=as_user,
        )
    ).config
    # A write that does not name the keys keeps them.
    assert keys_of(updated) == (masked(second), masked(first), 2)

    masked_callers = {
        "admin": ADMIN,
        "owner": as_user,
        "service": auth("service", "generator"),
        "admin with the permission": auth("admin", "ops", permissions=READ_SECRETS),
        "user with the permission": auth("user", uid, oid, permissions=READ_SECRETS),
    }
    for who, metadata in masked_callers.items():
        got = await ai_stub.GetAIConfig(ai.GetAIConfigRequest(id=created.id), metadata=metadata)
        assert keys_of(got.config) == (masked(second), masked(first), 2), who
        listed = await ai_stub.ListAIConfigs(ai.ListAIConfigsRequest(user_id=uid), metadata=metadata)
        assert [keys_of(c) for c in listed.configs] == [(masked(second), masked(first), 2)], who
        effective = await get_effective(ai_stub, uid, oid, metadata=metadata)
        assert keys_of(effective.configuration) == (masked(second), masked(first), 2), who

    got = await ai_stub.GetAIConfig(ai.GetAIConfigRequest(id=created.id), metadata=clear)
    assert keys_of(got.config) == (second, first, 2)
    listed = await ai_stub.ListAIConfigs(ai.ListAIConfigsRequest(user_id=uid), metadata=clear)
    assert [keys_of(c) for c in listed.configs] == [(second, first, 2)]
    effective = await get_effective(ai_stub, uid, oid, metadata=clear)
    assert keys_of(effective.configuration) == (second, first, 2)
    assert provenance_tuple(effective.provenance["api_keys.primary"]) == config_source(common_pb2.LAYER_USER, updated)

    # Watch messages (create, rotate, update) follow the same rule.
    for expected_version in (1, 2, 3):
        seen_masked = await next_config_change(watch_masked)
        seen_clear = await next_config_change(watch_clear)
        assert seen_masked.version == seen_clear.version == expected_version
        assert seen_masked.configuration.api_keys.primary.startswith("****")
        assert seen_clear.configuration.api_keys.primary in (first, second)
    assert keys_of(seen_masked.configuration) == (masked(second), masked(first), 2)
    assert keys_of(seen_clear.configuration) == (second, first, 2)
    watch_masked.cancel()
    watch_clear.cancel()

    # At rest: the key table holds ciphertext and last4 only; change rows hold masked keys.
    stored = await db.fetch(
        "SELECT slot, last4, nonce, ciphertext FROM ai_api_keys WHERE config_id = $1::uuid ORDER BY slot", created.id
    )
    assert [(r["slot"], r["last4"]) for r in stored] == [("primary", second[-4:]), ("secondary", first[-4:])]
    for row in stored:
        assert first[:-4].encode() not in row["ciphertext"] and second[:-4].encode() not in row["ciphertext"]
    changes = await db.fetch(
        "SELECT old_value::text AS old, new_value::text AS new, new_value FROM changes WHERE key = $1 ORDER BY id",
        f"ai_config/{created.id}",
    )
    assert len(changes) == 3
    last = changes[-1]["new_value"]["configuration"]
    assert (last["api_keys.primary"], last["api_keys.secondary"], last["api_keys.key_version"]) == (
        masked(second),
        masked(first),
        2,
    )

    # A full dump of the server's database holds neither key in clear.
    proc = await asyncio.create_subprocess_exec(
        str(PG_DUMP),
        "--no-owner",
        f"--dbname={app.dsn}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    dump = out.decode()
    assert "ai_api_keys" in dump and created.id in dump
    for key in (first, second):
        assert key[:-4] not in dump
        for row in changes:
            assert key[:-4] not in (row["old"] or "") and key[:-4] not in (row["new"] or "")
        assert key[:-4] not in caplog.text
        assert not any(key[:-4] in record.getMessage() for record in caplog.records)


async def test_a_key_set_comes_whole_from_the_most_specific_layer_with_keys(ai_stub, db) -> None:
    uid, oid = unique("u"), unique("o")
    org_primary, org_secondary, user_primary = new_key(), new_key(), new_key()
    org_config = await create_config(ai_stub, org_id=oid, keys={"primary": org_primary, "secondary": org_secondary})
    assert keys_of(org_config) == (masked(org_primary), masked(org_secondary), 1)
    # A user config without keys (only a schedule) leaves the org's key set in place.
    schedule_only = await create_config(ai_stub, user_id=uid, values={"api_keys.rotation_schedule": "quarterly"})
    reply = await get_effective(ai_stub, uid, oid)
    assert keys_of(reply.configuration) == (masked(org_primary), masked(org_secondary), 1)
    assert provenance_tuple(reply.provenance["api_keys.primary"]) == config_source(common_pb2.LAYER_ORG, org_config)
    assert provenance_tuple(reply.provenance["api_keys.secondary"]) == config_source(common_pb2.LAYER_ORG, org_config)
    assert reply.configuration.api_keys.rotation_schedule == ai.ROTATION_SCHEDULE_QUARTERLY
    assert reply.provenance["api_keys.rotation_schedule"].config_id == schedule_only.id
    # A user key replaces the whole set: never the user's primary with the org's secondary.
    user_config = await create_config(ai_stub, user_id=uid, priority=1, keys={"primary": user_primary})
    reply = await get_effective(ai_stub, uid, oid)
    assert keys_of(reply.configuration) == (masked(user_primary), "", 1)
    assert provenance_tuple(reply.provenance["api_keys.primary"]) == config_source(common_pb2.LAYER_USER, user_config)
    secondary = reply.provenance.get("api_keys.secondary")
    assert secondary is None or secondary.config_id == user_config.id
    # Deleting a config deletes its keys.
    await ai_stub.DeleteAIConfig(ai.DeleteAIConfigRequest(id=user_config.id), metadata=ADMIN)
    assert await db.fetchval("SELECT count(*) FROM ai_api_keys WHERE config_id = $1::uuid", user_config.id) == 0
    reply = await get_effective(ai_stub, uid, oid, metadata=auth("service", "svc", permissions=READ_SECRETS))
    assert keys_of(reply.configuration) == (org_primary, org_secondary, 1)


async def test_updating_the_primary_key_bumps_key_version(ai_stub) -> None:
    uid = unique("u")
    first, second = new_key(), new_key()
    config = await create_config(ai_stub, user_id=uid, keys={"primary": first})
    request = ai.UpdateAIConfigRequest(
        config=ai.AIConfig(id=config.id), update_mask=field_mask_pb2.FieldMask(paths=["configuration.api_keys.primary"])
    )
    request.config.configuration.api_keys.primary = second
    updated = (await ai_stub.UpdateAIConfig(request, metadata=ADMIN)).config
    assert (updated.version, updated.configuration.api_keys.primary, updated.configuration.api_keys.key_version) == (
        2,
        masked(second),
        2,
    )
    # Changing only the schedule leaves key_version alone.
    request = ai.UpdateAIConfigRequest(
        config=ai.AIConfig(id=config.id, configuration=configuration({"api_keys.rotation_schedule": "monthly"}))
    )
    same = (await ai_stub.UpdateAIConfig(request, metadata=ADMIN)).config
    assert (same.version, same.configuration.api_keys.primary, same.configuration.api_keys.key_version) == (
        3,
        masked(second),
        2,
    )
    rotated = (await ai_stub.RotateAPIKey(ai.RotateAPIKeyRequest(id=config.id, new_key=first), metadata=ADMIN)).config
    assert keys_of(rotated) == (masked(first), masked(second), 3) and rotated.version == 4


BAD_KEYS: dict[str, str] = {
    "shorter than 8": "sk-1234",
    "longer than 512": "k" * 513,
    "whitespace": "sk-ant-has space-123456",
    "tab": "sk-ant-\tabcdef123",
    "masked": "****abcd",
    "masked prefix": "****" + "abcdefgh12345678",
}


@pytest.mark.parametrize("case", list(BAD_KEYS))
async def test_malformed_keys_are_refused_and_write_nothing(ai_stub, db, case) -> None:
    bad = BAD_KEYS[case]
    uid = unique("u")
    config = await create_config(ai_stub, user_id=uid, keys={"primary": new_key()})
    before = await row_counts(db)
    for slot in ("primary", "secondary"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ai_stub.CreateAIConfig(
                ai.CreateAIConfigRequest(config=config_message(user_id=uid, keys={slot: bad})), metadata=ADMIN
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(field_violations(err.value)) == [f"config.configuration.api_keys.{slot}"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.RotateAPIKey(ai.RotateAPIKeyRequest(id=config.id, new_key=bad), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(err.value)) == ["new_key"]
    assert await row_counts(db) == before


async def test_keys_need_a_master_key(fresh_database, tmp_path) -> None:
    url = await fresh_database()
    uid, key = unique("u"), new_key()
    async with (
        App(make_settings(url, tmp_path)) as keyed,
        grpc.aio.insecure_channel(f"127.0.0.1:{keyed.port}") as channel,
    ):
        sealed = await create_config(
            ai_config_pb2_grpc.AIConfigServiceStub(channel), user_id=uid, keys={"primary": key}
        )
    # The same database served without a master key: keys can be neither written nor rotated.
    async with (
        App(make_settings(url, tmp_path, secret_key=None)) as keyless,
        grpc.aio.insecure_channel(f"127.0.0.1:{keyless.port}") as channel,
    ):
        stub = ai_config_pb2_grpc.AIConfigServiceStub(channel)
        plain = await create_config(stub, user_id=uid, values={"model.temperature": 0.1})
        assert plain.version == 1
        conn = await asyncpg.connect(url)
        try:
            before = await row_counts(conn)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await create_config(stub, user_id=uid, keys={"primary": new_key()})
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RotateAPIKey(ai.RotateAPIKeyRequest(id=sealed.id, new_key=new_key()), metadata=ADMIN)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert await row_counts(conn) == before
        finally:
            await conn.close()
        # What is stored stays readable, masked.
        got = await stub.GetAIConfig(ai.GetAIConfigRequest(id=sealed.id), metadata=ADMIN)
        assert keys_of(got.config) == (masked(key), "", 1)
