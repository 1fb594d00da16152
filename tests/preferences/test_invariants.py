"""A value never exists without its change row, nor a change row without its value."""

from __future__ import annotations

import grpc
import pytest

from tests.helpers.auth import auth, unique
from tests.helpers.requests import set_request, user

ADMIN = auth("admin")


async def test_failure_inside_the_write_transaction_leaves_neither_table_changed(stub, db):
    uid = unique("u")
    await stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=ADMIN)
    # Make the change-row insert fail for this user only, after the value upsert has run.
    await db.execute(
        f"""CREATE FUNCTION fail_{uid}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.scope_id = '{uid}' THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$;
            CREATE TRIGGER fail_{uid} BEFORE INSERT ON changes FOR EACH ROW EXECUTE FUNCTION fail_{uid}();"""
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.SetPreferences(
                set_request(user(uid), {"display.theme": "light", "locale.language": "de"}), metadata=ADMIN
            )
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "injected" not in err.value.details()
    finally:
        await db.execute(f"DROP TRIGGER fail_{uid} ON changes; DROP FUNCTION fail_{uid}();")
    values = await db.fetch("SELECT key, value, version FROM preference_values WHERE scope_id = $1 ORDER BY key", uid)
    assert [(r["key"], r["value"], r["version"]) for r in values] == [("display.theme", "dark", 1)]
    assert await db.fetchval("SELECT count(*) FROM changes WHERE scope_id = $1", uid) == 1


async def test_every_stored_version_has_exactly_its_change_rows(stub, db):
    uid = unique("u")
    for theme in ("dark", "light", "system"):
        await stub.SetPreferences(set_request(user(uid), {"display.theme": theme}), metadata=ADMIN)
    orphans = await db.fetchval(
        """SELECT count(*) FROM preference_values v
           WHERE NOT EXISTS (SELECT 1 FROM changes c WHERE c.kind = 'preference' AND c.scope_kind = v.scope_kind
                             AND c.scope_id = v.scope_id AND c.key = v.key AND c.version = v.version
                             AND c.new_value IS NOT DISTINCT FROM v.value)"""
    )
    assert orphans == 0
    versions = [
        r["version"] for r in await db.fetch("SELECT version FROM changes WHERE scope_id = $1 ORDER BY id", uid)
    ]
    assert versions == [1, 2, 3]


async def test_change_table_refuses_update_and_delete(db):
    import asyncpg

    with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
        await db.execute("UPDATE changes SET actor = 'mallory'")
    with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
        await db.execute("DELETE FROM changes")
