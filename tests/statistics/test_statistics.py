"""StatisticsService on the shared server: distributions, popular values, adoption, daily rollups, cursors,
sensitive keys, erasure, bad input and permissions."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from prefd.v1 import audit_pb2, audit_pb2_grpc, common_pb2, preferences_pb2, statistics_pb2, statistics_pb2_grpc
from prefd_server.app import App
from tests.helpers.auth import auth, unique
from tests.helpers.requests import error_reason, org, py, set_request, tv, user
from tests.helpers.statistics import SERVICE, assert_statistics_match_the_database, wait_counted

ADMIN = auth("admin", sub="stats-admin")


@pytest.fixture(scope="module")
def stats(channel: grpc.aio.Channel) -> statistics_pb2_grpc.StatisticsServiceStub:
    return statistics_pb2_grpc.StatisticsServiceStub(channel)


@pytest.fixture
async def category(stub: Any) -> dict[str, str]:
    """A fresh category with a string key, an int key and a sensitive string key; name -> key."""
    name = unique("stats")
    keys = {"color": f"{name}.color", "size": f"{name}.size", "secret": f"{name}.secret"}
    definitions = [
        preferences_pb2.Definition(
            key=keys["color"], category=name, type=common_pb2.VALUE_TYPE_STRING, default_value=tv("blue")
        ),
        preferences_pb2.Definition(
            key=keys["size"],
            category=name,
            type=common_pb2.VALUE_TYPE_INT,
            default_value=tv(10),
            min_value=0,
            max_value=99,
        ),
        preferences_pb2.Definition(
            key=keys["secret"], category=name, type=common_pb2.VALUE_TYPE_STRING, default_value=tv(""), sensitive=True
        ),
    ]
    for definition in definitions:
        definition.overridable_scopes.extend([common_pb2.SCOPE_KIND_USER, common_pb2.SCOPE_KIND_ORG])
        await stub.CreateDefinition(preferences_pb2.CreateDefinitionRequest(definition=definition), metadata=ADMIN)
    return {"category": name, **keys}


async def write(stub: Any, scope: common_pb2.Scope, values: dict[str, Any]) -> None:
    await stub.SetPreferences(set_request(scope, values, reason="stats test"), metadata=ADMIN)


async def key_statistics(stats: Any, key: str, **kwargs: Any) -> statistics_pb2.GetKeyStatisticsResponse:
    return await stats.GetKeyStatistics(statistics_pb2.GetKeyStatisticsRequest(key=key, **kwargs), metadata=SERVICE)


async def test_key_statistics_count_holders_and_values_top_n_plus_other(
    app: App, stub: Any, stats: Any, db: asyncpg.Connection, category: dict[str, str]
) -> None:
    color = category["color"]
    users = [unique("su") for _ in range(6)]
    for user_id, value in zip(users, ["red", "red", "red", "green", "green", "white"], strict=True):
        await write(stub, user(user_id), {color: value})
    acme = unique("so")
    await write(stub, org(acme), {color: "red"})
    await stub.DeletePreferences(
        preferences_pb2.DeletePreferencesRequest(scope=user(users[5]), keys=[color], reason="r"), metadata=ADMIN
    )
    counted = await wait_counted(db, stats)

    answer = await key_statistics(stats, color, top_n=1)
    s = answer.statistics
    assert (s.key, s.category, s.sensitive, s.holders) == (color, category["category"], False, 6)
    assert [(py(v.value), v.value_json, v.holders) for v in s.values] == [("red", '"red"', 4)]
    assert s.values[0].share == pytest.approx(4 / 6)
    assert (s.other_holders, s.distinct_values) == (2, 2)
    by_kind = {h.scope_kind: h.holders for h in s.holders_by_scope_kind}
    assert by_kind == {common_pb2.SCOPE_KIND_GLOBAL: 0, common_pb2.SCOPE_KIND_ORG: 1, common_pb2.SCOPE_KIND_USER: 5}
    # The cursor says what the figures reflect: at least everything committed before the wait ended.
    assert answer.cursor.token

    users_only = (await key_statistics(stats, color, scope_kind=common_pb2.SCOPE_KIND_USER)).statistics
    assert [(py(v.value), v.holders) for v in users_only.values] == [("red", 3), ("green", 2)]
    assert (users_only.holders, users_only.other_holders, users_only.scope_kind) == (5, 0, common_pb2.SCOPE_KIND_USER)
    orgs_only = (await key_statistics(stats, color, scope_kind=common_pb2.SCOPE_KIND_ORG)).statistics
    assert [(py(v.value), v.holders) for v in orgs_only.values] == [("red", 1)]
    assert counted.xid > 0
    await assert_statistics_match_the_database(db)


async def test_statistics_within_one_org_count_its_org_override_and_the_users_written_under_it(
    app: App, stub: Any, stats: Any, db: asyncpg.Connection, category: dict[str, str]
) -> None:
    color, size = category["color"], category["size"]
    acme, globex = unique("so"), unique("so")

    async def write_in(org_id: str, scope: common_pb2.Scope, values: dict[str, Any]) -> None:
        request = set_request(scope, values, reason="stats test", org_id=org_id)
        await stub.SetPreferences(request, metadata=ADMIN)

    for value in ["red", "red", "green"]:
        await write_in(acme, user(unique("su")), {color: value})
    await write_in(globex, user(unique("su")), {color: "red"})
    await write(stub, org(acme), {color: "green", size: 7})
    # A user writing its own preferences is counted in its token's org.
    self_writer = unique("su")
    await stub.SetPreferences(
        set_request(user(self_writer), {color: "white"}), metadata=auth("user", sub=self_writer, org=acme)
    )
    # A user whose latest write names another org counts there only.
    mover = unique("su")
    await write_in(acme, user(mover), {color: "white"})
    await write_in(globex, user(mover), {color: "green"})
    await wait_counted(db, stats)

    in_acme = (await key_statistics(stats, color, org_id=acme)).statistics
    assert in_acme.org_id == acme
    assert [(py(v.value), v.holders) for v in in_acme.values] == [("green", 2), ("red", 2), ("white", 1)]
    by_kind = {h.scope_kind: h.holders for h in in_acme.holders_by_scope_kind}
    assert by_kind == {common_pb2.SCOPE_KIND_GLOBAL: 0, common_pb2.SCOPE_KIND_ORG: 1, common_pb2.SCOPE_KIND_USER: 4}
    assert (in_acme.holders, in_acme.distinct_values) == (5, 3)
    acme_users = (await key_statistics(stats, color, org_id=acme, scope_kind=common_pb2.SCOPE_KIND_USER)).statistics
    assert [(py(v.value), v.holders) for v in acme_users.values] == [("red", 2), ("green", 1), ("white", 1)]
    in_globex = (await key_statistics(stats, color, org_id=globex)).statistics
    assert [(py(v.value), v.holders) for v in in_globex.values] == [("green", 1), ("red", 1)]
    everyone = (await key_statistics(stats, color)).statistics
    assert (everyone.org_id, everyone.holders) == ("", 7)
    nobody = (await key_statistics(stats, color, org_id=unique("so"))).statistics
    assert (nobody.holders, list(nobody.values)) == (0, [])

    popular = await stats.GetCategoryStatistics(
        statistics_pb2.GetCategoryStatisticsRequest(category=category["category"], org_id=acme), metadata=SERVICE
    )
    assert [(p.key, p.holders, py(p.most_common.value)) for p in popular.keys if p.holders] == [
        (color, 5, "green"),
        (size, 1, 7),
    ]
    await assert_statistics_match_the_database(db)


async def test_a_policy_is_counted_by_the_value_it_sets(
    app: App, stub: Any, stats: Any, db: asyncpg.Connection, category: dict[str, str]
) -> None:
    size = category["size"]
    capped = unique("so")
    write_policy = preferences_pb2.PreferenceWrite(key=size, value=tv(12), policy=preferences_pb2.Policy(max_value=20))
    await stub.SetPreferences(
        preferences_pb2.SetPreferencesRequest(scope=org(capped), writes=[write_policy], reason="cap"), metadata=ADMIN
    )
    await write(stub, org(unique("so")), {size: 12})
    await wait_counted(db, stats)
    orgs = (await key_statistics(stats, size, scope_kind=common_pb2.SCOPE_KIND_ORG)).statistics
    assert [(py(v.value), v.value_json, v.holders) for v in orgs.values] == [(12, "12", 2)]
    await assert_statistics_match_the_database(db)


async def test_category_statistics_give_each_key_its_most_popular_value(
    app: App, stub: Any, stats: Any, db: asyncpg.Connection, category: dict[str, str]
) -> None:
    for value, size in [("red", 5), ("green", 5), ("green", 7)]:
        await write(stub, user(unique("su")), {category["color"]: value, category["size"]: size})
    await write(stub, user(unique("su")), {category["secret"]: "hidden-value"})
    await wait_counted(db, stats)
    answer = await stats.GetCategoryStatistics(
        statistics_pb2.GetCategoryStatisticsRequest(category=category["category"]), metadata=SERVICE
    )
    popular = {p.key: p for p in answer.keys}
    assert [p.key for p in answer.keys] == [category["color"], category["size"], category["secret"]]
    assert (py(popular[category["color"]].most_common.value), popular[category["color"]].most_common.holders) == (
        "green",
        2,
    )
    assert (py(popular[category["size"]].most_common.value), popular[category["size"]].holders) == (5, 3)
    secret = popular[category["secret"]]
    assert (secret.sensitive, secret.holders, secret.HasField("most_common")) == (True, 1, False)
    assert answer.cursor.token


async def test_sensitive_keys_are_counts_only_and_their_values_are_never_kept(
    app: App, stub: Any, stats: Any, db: asyncpg.Connection, category: dict[str, str]
) -> None:
    secret = category["secret"]
    for value in ["s3cr3t-a", "s3cr3t-a", "s3cr3t-b"]:
        await write(stub, user(unique("su")), {secret: value})
    await wait_counted(db, stats)
    s = (await key_statistics(stats, secret)).statistics
    assert (s.sensitive, s.holders, s.other_holders, s.distinct_values, list(s.values)) == (True, 3, 3, 0, [])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await key_statistics(stats, secret, top_n=5)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(refused.value) == "SENSITIVE_KEY"
    kept = await db.fetch("SELECT * FROM statistics_values WHERE key = $1", secret)
    assert kept == []
    assert not await db.fetchval("SELECT count(*) FROM statistics_values WHERE value_json LIKE '%s3cr3t%'")
    adoption = await stats.GetAdoption(statistics_pb2.GetAdoptionRequest(key=secret), metadata=SERVICE)
    assert adoption.users_overriding == 3 and not adoption.HasField("users_at_default_value")
    today = datetime.now(UTC).date().isoformat()
    rollups = await stats.ListDailyRollups(
        statistics_pb2.ListDailyRollupsRequest(key=secret, start_date=today, end_date=today), metadata=SERVICE
    )
    assert rollups.rollups[0].holders == 3 and not rollups.rollups[0].HasField("most_common")


async def test_adoption_is_the_share_of_known_users_overriding_the_key(
    app: App, stub: Any, stats: Any, db: asyncpg.Connection, category: dict[str, str]
) -> None:
    color, size = category["color"], category["size"]
    await write(stub, user(unique("su")), {color: "blue"})  # the default's value, still an override
    await write(stub, user(unique("su")), {color: "red"})
    await write(stub, user(unique("su")), {size: 3})
    await wait_counted(db, stats)
    answer = await stats.GetAdoption(statistics_pb2.GetAdoptionRequest(key=color), metadata=SERVICE)
    known = await db.fetchval("SELECT count(DISTINCT scope_id) FROM preference_values WHERE scope_kind = 'USER'")
    assert (answer.users_overriding, answer.users_at_default_value, answer.known_users) == (2, 1, known)
    assert answer.adoption_rate == pytest.approx(2 / known)
    assert answer.cursor.token


async def test_daily_rollups_count_the_days_changes_and_carry_the_state_over_quiet_days(
    app: App, stub: Any, stats: Any, db: asyncpg.Connection, category: dict[str, str]
) -> None:
    color = category["color"]
    first, second = unique("su"), unique("su")
    await write(stub, user(first), {color: "red"})
    await write(stub, user(first), {color: "green"})
    await write(stub, user(second), {color: "green"})
    await wait_counted(db, stats)
    today = datetime.now(UTC).date()
    answer = await stats.ListDailyRollups(
        statistics_pb2.ListDailyRollupsRequest(
            key=color,
            start_date=(today - timedelta(days=2)).isoformat(),
            end_date=(today + timedelta(days=1)).isoformat(),
        ),
        metadata=SERVICE,
    )
    days = [(r.date, r.changes, r.holders, r.users) for r in answer.rollups]
    assert [d[0] for d in days] == [(today + timedelta(days=n)).isoformat() for n in (-2, -1, 0, 1)]
    assert days[0][1:] == (0, 0, 0) and days[1][1:] == (0, 0, 0)
    assert days[2][1:] == (3, 2, 2)
    assert days[3][1:] == (0, 2, 2)  # no change that day: the state carries over
    assert py(answer.rollups[2].most_common.value) == "green" and answer.rollups[2].most_common.holders == 2
    assert answer.cursor.token


async def test_erasure_takes_the_user_out_of_every_count(
    app: App, stub: Any, stats: Any, db: asyncpg.Connection, category: dict[str, str], channel: grpc.aio.Channel
) -> None:
    color, secret = category["color"], category["secret"]
    leaving, staying = unique("su"), unique("su")
    await write(stub, user(leaving), {color: "red", secret: "x"})
    await write(stub, user(leaving), {color: "green"})
    await write(stub, user(staying), {color: "green"})
    await wait_counted(db, stats)
    known_before = (await stats.GetAdoption(statistics_pb2.GetAdoptionRequest(key=color), metadata=SERVICE)).known_users
    audit = audit_pb2_grpc.AuditServiceStub(channel)
    await audit.EraseUserData(audit_pb2.EraseUserDataRequest(user_id=leaving, reason="gdpr"), metadata=ADMIN)
    # The erasure's transaction takes the user out at once, before the consumer reads its change row.
    assert not await db.fetchval("SELECT count(*) FROM statistics_current WHERE scope_id = $1", leaving)
    assert not await db.fetchval("SELECT count(*) FROM statistics_users WHERE user_id = $1", leaving)
    await wait_counted(db, stats)
    s = (await key_statistics(stats, color)).statistics
    assert [(py(v.value), v.holders) for v in s.values] == [("green", 1)]
    assert (await key_statistics(stats, secret)).statistics.holders == 0
    adoption = await stats.GetAdoption(statistics_pb2.GetAdoptionRequest(key=color), metadata=SERVICE)
    assert adoption.known_users == known_before - 1
    # Neither the id nor its pseudonym is left anywhere in the statistics.
    for table in ("statistics_current", "statistics_users"):
        column = "scope_id" if table == "statistics_current" else "user_id"
        rows = await db.fetch(f"SELECT {column} FROM {table} WHERE {column} = $1 OR {column} LIKE 'erased-%'", leaving)
        assert rows == [], table
    await assert_statistics_match_the_database(db)


@pytest.mark.parametrize(
    ("method", "request_fields", "code", "field"),
    [
        ("GetKeyStatistics", {"key": "no.such.key"}, grpc.StatusCode.NOT_FOUND, "key"),
        ("GetKeyStatistics", {"key": ""}, grpc.StatusCode.INVALID_ARGUMENT, "key"),
        ("GetKeyStatistics", {"key": "bad key\x01"}, grpc.StatusCode.INVALID_ARGUMENT, "key"),
        ("GetKeyStatistics", {"key": "display.theme", "top_n": 101}, grpc.StatusCode.INVALID_ARGUMENT, "top_n"),
        ("GetKeyStatistics", {"key": "display.theme", "top_n": -1}, grpc.StatusCode.INVALID_ARGUMENT, "top_n"),
        (
            "GetKeyStatistics",
            {"key": "notifications.sms.phone_number", "top_n": 3},
            grpc.StatusCode.FAILED_PRECONDITION,
            "top_n",
        ),
        ("GetCategoryStatistics", {"category": "no-such-category"}, grpc.StatusCode.NOT_FOUND, "category"),
        ("GetCategoryStatistics", {"category": ""}, grpc.StatusCode.INVALID_ARGUMENT, "category"),
        (
            "GetKeyStatistics",
            {"key": "display.theme", "org_id": "no spaces"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "org_id",
        ),
        (
            "GetCategoryStatistics",
            {"category": "display", "org_id": "-leading-dash"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "org_id",
        ),
        ("GetAdoption", {"key": "no.such.key"}, grpc.StatusCode.NOT_FOUND, "key"),
        (
            "ListDailyRollups",
            {"key": "display.theme", "start_date": "2026-13-01", "end_date": "2026-01-02"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "start_date",
        ),
        (
            "ListDailyRollups",
            {"key": "display.theme", "start_date": "2026-01-05", "end_date": "2026-01-02"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "end_date",
        ),
        (
            "ListDailyRollups",
            {"key": "display.theme", "start_date": "2025-01-01", "end_date": "2026-01-02"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "end_date",
        ),
        (
            "ListDailyRollups",
            {"key": "no.such.key", "start_date": "2026-01-01", "end_date": "2026-01-02"},
            grpc.StatusCode.NOT_FOUND,
            "key",
        ),
    ],
)
async def test_bad_input_gets_its_code_with_a_field_violation_and_writes_nothing(
    app: App,
    stats: Any,
    db: asyncpg.Connection,
    method: str,
    request_fields: dict[str, Any],
    code: grpc.StatusCode,
    field: str,
) -> None:
    request_class = getattr(statistics_pb2, f"{method}Request")
    await wait_counted(db, stats)
    before = await statistics_fingerprint(db)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await getattr(stats, method)(request_class(**request_fields), metadata=SERVICE)
    assert refused.value.code() == code
    assert field in violations_of(refused.value)
    assert await statistics_fingerprint(db) == before


def violations_of(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The BadRequest field violations of an error, whatever its code."""
    status = rpc_status.from_call(error)
    assert status is not None, error
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found


async def statistics_fingerprint(db: asyncpg.Connection) -> list[Any]:
    """Every statistics row and the change count: what a refused call must leave as it was."""
    tables = ["statistics_position", "statistics_keys", "statistics_values", "statistics_totals", "statistics_daily"]
    return [await db.fetch(f"SELECT * FROM {t} ORDER BY 1, 2") for t in tables] + [
        await db.fetchval("SELECT count(*) FROM changes")
    ]


@pytest.mark.parametrize("role", ["user"])
async def test_users_may_not_read_statistics_services_and_admins_may(app: App, stats: Any, role: str) -> None:
    for method, request in [
        ("GetKeyStatistics", statistics_pb2.GetKeyStatisticsRequest(key="display.theme")),
        ("GetCategoryStatistics", statistics_pb2.GetCategoryStatisticsRequest(category="display")),
        ("GetAdoption", statistics_pb2.GetAdoptionRequest(key="display.theme")),
        (
            "ListDailyRollups",
            statistics_pb2.ListDailyRollupsRequest(key="display.theme", start_date="2026-01-01", end_date="2026-01-01"),
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await getattr(stats, method)(request, metadata=auth(role, sub="alice", org="acme"))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
        await getattr(stats, method)(request, metadata=SERVICE)
        await getattr(stats, method)(request, metadata=ADMIN)
    with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
        await stats.GetKeyStatistics(statistics_pb2.GetKeyStatisticsRequest(key="display.theme"))
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_cursor_is_the_feed_position_the_figures_reflect(
    app: App, stub: Any, stats: Any, db: asyncpg.Connection, category: dict[str, str]
) -> None:
    color, someone = category["color"], unique("su")
    await write(stub, user(someone), {color: "red"})
    await wait_counted(db, stats)
    counted = await key_statistics(stats, color)
    assert [(py(v.value), v.holders) for v in counted.statistics.values] == [("red", 1)]
    await write(stub, user(someone), {color: "green"})
    # Watching from the statistics' cursor delivers what they did not count yet: the second write, not the first.
    request = preferences_pb2.WatchPreferencesRequest(scope=user(someone), start_cursor=counted.cursor)
    stream = stub.WatchPreferences(request, metadata=ADMIN)
    try:
        async with asyncio.timeout(10):
            async for message in stream:
                if message.HasField("change"):
                    assert (message.change.key, message.change.version, py(message.change.new_value)) == (
                        color,
                        2,
                        "green",
                    )
                    break
    finally:
        stream.cancel()
