"""The notification settings: shipped definitions, org-wide overrides, value checks on write, migration 0007."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from hypothesis import given
from hypothesis import strategies as st

from prefd.v1 import common_pb2, preferences_pb2
from prefd_server.kernel.db import migrate, migration_files
from prefd_server.kernel.value_checks import ValueChecks
from prefd_server.preferences.catalog import load_catalog
from prefd_server.preferences.notification_checks import add_notification_checks
from tests.helpers.auth import auth, unique
from tests.helpers.requests import field_violations, org, py, set_request, tv, user

ADMIN = auth("admin")
WEEK = ["MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"]

NEW_DEFAULTS: dict[str, Any] = {
    "notifications.voice.enabled": False,
    "notifications.voice.phone_number": "",
    "notifications.category_channels": {},
    "notifications.quiet_hours.enabled": False,
    "notifications.quiet_hours.start": "22:00",
    "notifications.quiet_hours.end": "07:00",
    "notifications.quiet_hours.days": WEEK,
    "notifications.quiet_hours.defer_in_app": False,
    "notifications.category_frequency": {},
    "notifications.digest.time": "09:00",
    "notifications.digest.weekday": "MON",
    "notifications.critical_bypass_throttle": True,
    "notifications.consent_purposes": {},
    "notifications.frequency": "immediate",
}


async def _effective(stub, subject: common_pb2.Subject) -> dict[str, preferences_pb2.EffectiveValue]:
    reply = await stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(subject=subject, key_prefixes=["notifications."]),
        metadata=ADMIN,
    )
    return {v.key: v for v in reply.values}


async def test_the_notification_settings_are_defined_with_their_defaults(stub) -> None:
    got = await _effective(stub, common_pb2.Subject(user_id=unique("u"), org_id=unique("o")))
    for key, default in NEW_DEFAULTS.items():
        assert py(got[key].value) == default, key
        assert got[key].provenance.layer == common_pb2.LAYER_DEFAULT, key
    rules = py(got["notifications.event_rules"].value)
    assert rules["LARGE_LOSS"] == {
        "enabled": True,
        "channels": ["EMAIL", "SMS", "PUSH"],
        "priority": "HIGH",
        "throttle_minutes": 60,
        "throttle_limit": 1,
        "conditions": {"loss_amount": {"min": 1000}},
    }
    frequency = await stub.GetDefinition(
        preferences_pb2.GetDefinitionRequest(key="notifications.frequency"), metadata=ADMIN
    )
    assert [py(v) for v in frequency.definition.allowed_values] == ["immediate", "hourly", "daily", "weekly"]
    # The replaced keys stay defined.
    assert "notifications.trading.event_rules" in got
    assert "notifications.trading.critical_bypass_throttle" in got


async def test_an_org_override_reaches_every_user_of_the_org(stub) -> None:
    org_id = unique("o")
    await stub.SetPreferences(
        set_request(org(org_id), {"notifications.quiet_hours.enabled": True, "notifications.frequency": "hourly"}),
        metadata=ADMIN,
    )
    subjects = [common_pb2.Subject(user_id=unique("u"), org_id=org_id) for _ in range(3)]
    batch = await stub.BatchGetEffectivePreferences(
        preferences_pb2.BatchGetEffectivePreferencesRequest(subjects=subjects, key_prefixes=["notifications."]),
        metadata=ADMIN,
    )
    for result in batch.results:
        got = {v.key: v for v in result.values}
        for key, value in [("notifications.quiet_hours.enabled", True), ("notifications.frequency", "hourly")]:
            assert py(got[key].value) == value
            assert got[key].provenance.layer == common_pb2.LAYER_ORG
            assert got[key].provenance.scope == org(org_id)
    outsider = await _effective(stub, common_pb2.Subject(user_id=unique("u"), org_id=unique("o")))
    assert py(outsider["notifications.quiet_hours.enabled"].value) is False


MALFORMED = {
    "quiet hours start past midnight": ("notifications.quiet_hours.start", "25:00"),
    "quiet hours end without minutes": ("notifications.quiet_hours.end", "7"),
    "digest time with seconds": ("notifications.digest.time", "09:00:00"),
    "unknown channel": ("notifications.category_channels", {"x": {"FAX": True}}),
    "channel switch not a bool": ("notifications.category_channels", {"x": {"EMAIL": "off"}}),
    "channels not an object": ("notifications.category_channels", {"x": ["EMAIL"]}),
    "empty category": ("notifications.category_channels", {"": {"EMAIL": False}}),
    "unknown frequency": ("notifications.category_frequency", {"errors": "monthly"}),
    "purpose not a string": ("notifications.consent_purposes", {"marketing": 3}),
    "over-long purpose": ("notifications.consent_purposes", {"marketing": "p" * 129}),
    "a weekday twice": ("notifications.quiet_hours.days", ["MON", "MON"]),
    "unknown weekday": ("notifications.quiet_hours.days", ["MONDAY"]),
}


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_notification_setting_is_refused_and_writes_nothing(stub, db, case) -> None:
    key, value = case
    uid = unique("u")
    before = await db.fetchval("SELECT max(id) FROM changes")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SetPreferences(
            set_request(user(uid), {"notifications.email.enabled": False, key: value}), metadata=ADMIN
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(refused.value)
    assert list(violations) == ["writes[1].value"], violations
    assert violations["writes[1].value"].startswith(key)
    assert await db.fetchval("SELECT count(*) FROM preference_values WHERE scope_id = $1", uid) == 0
    assert await db.fetchval("SELECT count(*) FROM changes WHERE id > $1 AND scope_id = $2", before, uid) == 0


async def test_well_formed_notification_settings_are_stored(stub) -> None:
    uid = unique("u")
    values = {
        "notifications.quiet_hours.start": "23:30",
        "notifications.quiet_hours.end": "00:00",
        "notifications.digest.time": "18:05",
        "notifications.category_channels": {"errors": {"SMS": False, "VOICE": True}},
        "notifications.category_frequency": {"generation_complete": "daily"},
        "notifications.consent_purposes": {"marketing": "marketing_email"},
        "notifications.quiet_hours.days": ["FRI", "SAT"],
    }
    await stub.SetPreferences(set_request(user(uid), values), metadata=ADMIN)
    got = await _effective(stub, common_pb2.Subject(user_id=uid))
    assert {key: py(got[key].value) for key in values} == values


async def test_a_definition_default_the_checks_refuse_is_invalid(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.UpdateDefinition(
            preferences_pb2.UpdateDefinitionRequest(
                definition=preferences_pb2.Definition(key="notifications.digest.time", default_value=tv("9am")),
                update_mask=field_mask_pb2.FieldMask(paths=["default_value"]),
            ),
            metadata=ADMIN,
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "definition.default_value" in field_violations(refused.value)
    stored = await stub.GetDefinition(
        preferences_pb2.GetDefinitionRequest(key="notifications.digest.time"), metadata=ADMIN
    )
    assert py(stored.definition.default_value) == "09:00"


def test_the_shipped_defaults_pass_the_checks() -> None:
    checks = ValueChecks()
    add_notification_checks(checks)
    shipped = {d.key: d for d in load_catalog().definitions}
    assert checks.keys() <= shipped.keys()
    for key in checks.keys():
        assert checks.problems(key, shipped[key].default) == [], key


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@given(value=_json)
def test_the_checks_answer_any_json_value_with_a_list_of_problems(value: Any) -> None:
    checks = ValueChecks()
    add_notification_checks(checks)
    for key in checks.keys():
        problems = checks.problems(key, value)
        assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)


# --- migration 0007 ---------------------------------------------------------------------------

OLD_FREQUENCY = {
    "allowed": ["immediate", "daily", "weekly"],
    "description": "How often non-critical notifications are delivered: immediately or as a daily or weekly digest.",
}


async def _migrate_through(conn: asyncpg.Connection, last: int) -> None:
    """Apply the bundled migrations up to version `last` as migrate() would."""
    await conn.execute(
        """CREATE TABLE schema_migrations (
               version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    for version, name, sql in migration_files():
        if version <= last:
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)


async def _set_old(conn: asyncpg.Connection, kind: str, scope_id: str, key: str, value: Any, version: int) -> None:
    """A stored override as an old server wrote it, with its change row."""
    stored = None if value is None else json.dumps(value)
    await conn.execute(
        """INSERT INTO preference_values (scope_kind, scope_id, key, value, version, updated_by)
           VALUES ($1, $2, $3, $4::jsonb, $5, 'ops')""",
        kind,
        scope_id,
        key,
        stored,
        version,
    )
    await conn.execute(
        """INSERT INTO changes (kind, scope_kind, scope_id, key, new_value, version, actor)
           VALUES ('preference', $1, $2, $3, $4::jsonb, $5, 'ops')""",
        kind,
        scope_id,
        key,
        stored,
        version,
    )


async def test_migration_0007_carries_the_trading_settings_into_the_new_keys(fresh_database) -> None:
    conn = await asyncpg.connect(await fresh_database())
    try:
        await _migrate_through(conn, 6)
        rules = {"LARGE_LOSS": {"enabled": True, "channels": ["EMAIL"], "conditions": {"loss_amount": {"min": 5}}}}
        await _set_old(conn, "ORG", "acme", "notifications.trading.event_rules", rules, 3)
        await _set_old(conn, "USER", "u1", "notifications.trading.critical_bypass_throttle", False, 1)
        await _set_old(conn, "USER", "u2", "notifications.trading.event_rules", None, 2)  # removed: not copied
        await conn.execute(
            """INSERT INTO definitions (key, category, value_type, default_value, allowed_values, scopes,
                   description, updated_by)
               VALUES ('notifications.frequency', 'notifications', 'enum', '"immediate"', $1::jsonb,
                   '{GLOBAL,ORG,USER}', $2, 'prefd:catalog')""",
            json.dumps(OLD_FREQUENCY["allowed"]),
            OLD_FREQUENCY["description"],
        )

        applied = await migrate(conn)
        assert applied[0] == "0007_notification_settings.sql"

        copied = await conn.fetch(
            """SELECT scope_kind, scope_id, key, value, version, updated_by FROM preference_values
               WHERE key IN ('notifications.event_rules', 'notifications.critical_bypass_throttle')
               ORDER BY scope_kind, scope_id"""
        )
        assert [(r["scope_kind"], r["scope_id"], r["key"], json.loads(r["value"]), r["version"]) for r in copied] == [
            ("ORG", "acme", "notifications.event_rules", rules, 1),
            ("USER", "u1", "notifications.critical_bypass_throttle", False, 1),
        ]
        assert {r["updated_by"] for r in copied} == {"prefd:migration"}
        # No value without its change row.
        change_rows = await conn.fetch(
            """SELECT kind, scope_kind, scope_id, key, old_value, new_value, version, actor, reason FROM changes
               WHERE key IN ('notifications.event_rules', 'notifications.critical_bypass_throttle') ORDER BY id"""
        )
        assert [{**r, "new_value": json.loads(r["new_value"])} for r in change_rows] == [
            {
                "kind": "preference",
                "scope_kind": scope_kind,
                "scope_id": scope_id,
                "key": new_key,
                "old_value": None,
                "new_value": value,
                "version": 1,
                "actor": "prefd:migration",
                "reason": f"migrated from {old_key}",
            }
            for scope_kind, scope_id, new_key, old_key, value in [
                ("ORG", "acme", "notifications.event_rules", "notifications.trading.event_rules", rules),
                (
                    "USER",
                    "u1",
                    "notifications.critical_bypass_throttle",
                    "notifications.trading.critical_bypass_throttle",
                    False,
                ),
            ]
        ]
        # The old overrides stay where they were.
        assert (
            await conn.fetchval("SELECT count(*) FROM preference_values WHERE key LIKE 'notifications.trading.%'") == 3
        )

        frequency = await conn.fetchrow(
            "SELECT allowed_values, version, updated_by FROM definitions WHERE key = 'notifications.frequency'"
        )
        assert json.loads(frequency["allowed_values"]) == ["immediate", "hourly", "daily", "weekly"]
        assert (frequency["version"], frequency["updated_by"]) == (2, "prefd:migration")
        change = await conn.fetchrow(
            """SELECT old_value, new_value, version FROM changes
               WHERE kind = 'definition' AND key = 'notifications.frequency'"""
        )
        assert json.loads(change["old_value"])["allowed_values"] == OLD_FREQUENCY["allowed"]
        assert json.loads(change["new_value"])["allowed_values"] == ["immediate", "hourly", "daily", "weekly"]
        assert change["version"] == 2
    finally:
        await conn.close()


async def test_migration_0007_leaves_an_admins_edit_of_the_frequency_definition_alone(fresh_database) -> None:
    conn = await asyncpg.connect(await fresh_database())
    try:
        await _migrate_through(conn, 6)
        await conn.execute(
            """INSERT INTO definitions (key, category, value_type, default_value, allowed_values, scopes,
                   description, updated_by)
               VALUES ('notifications.frequency', 'notifications', 'enum', '"daily"', '["daily", "weekly"]',
                   '{GLOBAL,ORG,USER}', 'ours', 'admin')"""
        )
        await migrate(conn)
        row = await conn.fetchrow(
            "SELECT allowed_values, version FROM definitions WHERE key = 'notifications.frequency'"
        )
        assert (json.loads(row["allowed_values"]), row["version"]) == (["daily", "weekly"], 1)
        assert await conn.fetchval("SELECT count(*) FROM changes WHERE kind = 'definition'") == 0
    finally:
        await conn.close()
