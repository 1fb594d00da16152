"""Hostile input from an ordinary caller: each case ends in a canonical code naming the field and
writes nothing; stored values round-trip through every read path; memory a caller can make the
server keep stays bounded."""

from __future__ import annotations

import asyncio
import string
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from prefd.v1 import (
    ai_config_pb2,
    ai_config_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    common_pb2,
    health_pb2,
    health_pb2_grpc,
    preferences_pb2,
    preferences_pb2_grpc,
)
from prefd_server.kernel.ids import MAX_KEY_SEGMENTS
from prefd_server.rpc.limits import MAX_JSON_DEPTH
from tests.helpers.auth import auth, unique
from tests.helpers.processes import prefd_process
from tests.helpers.requests import error_reason, field_violations, set_request, tv, user
from tests.helpers.settings import SECRET

ADMIN = auth("admin")
SERVICE = auth("service", sub="generator")


def subject(uid: str, org: str = "") -> common_pb2.Subject:
    return common_pb2.Subject(user_id=uid, org_id=org)


async def rows_everywhere(db: Any) -> dict[str, int]:
    """Row counts of every table a refused call might touch."""
    tables = [
        "changes",
        "preference_values",
        "definitions",
        "ai_configs",
        "ai_models",
        "ai_usage",
        "ai_usage_totals",
        "maintenance_operations",
        "erasures",
    ]
    return {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in tables}


def names(violations: dict[str, str], field: str) -> bool:
    """Whether a violation names `field` or a part of it."""
    return any(v == field or v.startswith((f"{field}.", f"{field}[")) for v in violations)


def deep_json(depth: int) -> dict[str, Any]:
    """A JSON object with `depth` objects nested below the top one."""
    value: dict[str, Any] = {"leaf": 1.5}
    for _ in range(depth):
        value = {"n": value}
    return value


NUL = "a\x00b"


def new_definition(key: str, **fields: Any) -> preferences_pb2.CreateDefinitionRequest:
    """A CreateDefinition request in category `probe`, overridable at USER scope unless said."""
    fields.setdefault("category", "probe")
    fields.setdefault("overridable_scopes", [common_pb2.SCOPE_KIND_USER])
    return preferences_pb2.CreateDefinitionRequest(definition=preferences_pb2.Definition(key=key, **fields))


TIME_TOO_LATE = timestamp_pb2.Timestamp(seconds=253402300800)
NANOS_TOO_BIG = timestamp_pb2.Timestamp(seconds=1, nanos=1_000_000_000)


def _cases(uid: str) -> list[tuple[str, str, Any, str]]:
    """(service, method, request, field expected in the violations)."""
    scope = user(uid)
    config = ai_config_pb2.AIConfig(name="c1", user_id=uid, active=True)
    return [
        ("prefs", "SetPreferences", set_request(scope, {"display.theme": "dark"}, reason=NUL), "reason"),
        ("prefs", "SetPreferences", set_request(scope, {"locale.timezone": NUL}), "writes[0].value.string_value"),
        (
            "prefs",
            "SetPreferences",
            set_request(common_pb2.Scope(kind=3, id=f"{uid}\n"), {"display.theme": "dark"}),
            "scope.id",
        ),
        (
            "prefs",
            "SetPreferences",
            set_request(scope, {"notifications.trading.event_rules": {"x\x00": 1}}),
            "writes[0].value.json_value",
        ),
        (
            "prefs",
            "SetPreferences",
            preferences_pb2.SetPreferencesRequest(
                scope=scope,
                writes=[
                    preferences_pb2.PreferenceWrite(
                        key="notifications.trading.event_rules",
                        value=common_pb2.TypedValue(
                            json_value=struct_pb2.Struct(fields={"n": struct_pb2.Value(number_value=float("nan"))})
                        ),
                    )
                ],
            ),
            "writes[0].value.json_value",
        ),
        (
            "prefs",
            "SetPreferences",
            set_request(scope, {"notifications.trading.event_rules": deep_json(MAX_JSON_DEPTH + 1)}),
            "writes[0].value.json_value",
        ),
        (
            "prefs",
            "DeletePreferences",
            preferences_pb2.DeletePreferencesRequest(scope=scope, keys=["display.theme"], reason=NUL),
            "reason",
        ),
        (
            "prefs",
            "CreateDefinition",
            new_definition("probe.nl\n", type=common_pb2.VALUE_TYPE_BOOL, default_value=tv(True)),
            "definition.key",
        ),
        (
            "prefs",
            "CreateDefinition",
            new_definition(
                "probe.desc",
                description=NUL,
                type=common_pb2.VALUE_TYPE_BOOL,
                default_value=tv(True),
            ),
            "definition.description",
        ),
        (
            "prefs",
            "CreateDefinition",
            new_definition(
                "probe.nan",
                type=common_pb2.VALUE_TYPE_DOUBLE,
                default_value=tv(1.0),
                min_value=float("nan"),
            ),
            "definition.min_value",
        ),
        (
            "prefs",
            "CreateDefinition",
            new_definition("probe.default", type=common_pb2.VALUE_TYPE_STRING, default_value=tv(NUL)),
            "definition.default_value.string_value",
        ),
        (
            "prefs",
            "CreateDefinition",
            new_definition("a.b.c.d.e.f.g.h.i", type=common_pb2.VALUE_TYPE_BOOL, default_value=tv(True)),
            "definition.key",
        ),
        ("prefs", "ListDefinitions", preferences_pb2.ListDefinitionsRequest(category=NUL), "category"),
        ("prefs", "ListDefinitions", preferences_pb2.ListDefinitionsRequest(page_token=f"x{NUL}"), "page_token"),
        (
            "prefs",
            "GetEffectivePreferences",
            preferences_pb2.GetEffectivePreferencesRequest(subject=subject(uid), key_prefixes=["d"] * 65),
            "key_prefixes",
        ),
        ("ai", "CreateAIConfig", ai_config_pb2.CreateAIConfigRequest(config=config, reason=NUL), "reason"),
        (
            "ai",
            "CreateAIConfig",
            ai_config_pb2.CreateAIConfigRequest(
                config=ai_config_pb2.AIConfig(
                    name="rich",
                    user_id=uid,
                    configuration=ai_config_pb2.AIConfiguration(
                        cost_budget=ai_config_pb2.CostBudget(daily_usd=1e19, weekly_usd=1e19, monthly_usd=1e19)
                    ),
                )
            ),
            "config.configuration.cost_budget.daily_usd",
        ),
        (
            "ai",
            "CreateAIConfig",
            ai_config_pb2.CreateAIConfigRequest(config=ai_config_pb2.AIConfig(name="n\n", user_id=uid)),
            "config.name",
        ),
        ("ai", "ListAIConfigs", ai_config_pb2.ListAIConfigsRequest(user_id=uid, page_token="abc"), "page_token"),
        (
            "ai",
            "UpdateModel",
            ai_config_pb2.UpdateModelRequest(
                model=ai_config_pb2.AIModel(model="m1", context_window=10, output_limit=5, features=[NUL])
            ),
            "model.features[0]",
        ),
        (
            "ai",
            "EstimateCost",
            ai_config_pb2.EstimateCostRequest(model="claude-3-haiku-20240307", input_tokens=2**62, output_tokens=2**62),
            "input_tokens",
        ),
        (
            "ai",
            "RecordUsage",
            ai_config_pb2.RecordUsageRequest(
                subject=subject(uid), model="claude-3-haiku-20240307", input_tokens=1, output_tokens=1, request_id=NUL
            ),
            "request_id",
        ),
        (
            "ai",
            "RecordUsage",
            ai_config_pb2.RecordUsageRequest(
                subject=subject(uid), model="claude-3-haiku-20240307", input_tokens=1, output_tokens=1, request_id="r\n"
            ),
            "request_id",
        ),
        (
            "ai",
            "GetEffectiveAIConfig",
            ai_config_pb2.GetEffectiveAIConfigRequest(subject=subject(f"{uid}\n")),
            "subject.user_id",
        ),
        ("audit", "ListChanges", audit_pb2.ListChangesRequest(start_time=TIME_TOO_LATE), "start_time"),
        ("audit", "ListChanges", audit_pb2.ListChangesRequest(end_time=NANOS_TOO_BIG), "end_time"),
        ("audit", "ListChanges", audit_pb2.ListChangesRequest(page_token="x"), "page_token"),
        (
            "audit",
            "DiffScope",
            audit_pb2.DiffScopeRequest(scope=scope, to=audit_pb2.HistoryPoint(time=TIME_TOO_LATE)),
            "to.time",
        ),
        (
            "audit",
            "PreviewRollback",
            audit_pb2.PreviewRollbackRequest(
                target=audit_pb2.RollbackTarget(scopes=[scope], to=audit_pb2.HistoryPoint(time=NANOS_TOO_BIG))
            ),
            "target.to.time",
        ),
        (
            "audit",
            "Rollback",
            audit_pb2.RollbackRequest(
                target=audit_pb2.RollbackTarget(scopes=[scope], to=audit_pb2.HistoryPoint(change_id=1)), reason=NUL
            ),
            "reason",
        ),
        ("audit", "EraseUserData", audit_pb2.EraseUserDataRequest(user_id=uid, reason=NUL), "reason"),
        ("audit", "EraseUserData", audit_pb2.EraseUserDataRequest(user_id=f"{uid}\n", reason="gdpr"), "user_id"),
        (
            "health",
            "RunMaintenance",
            health_pb2.RunMaintenanceRequest(
                operation=health_pb2.MAINTENANCE_OPERATION_ANALYZE, target="changes", reason=NUL
            ),
            "reason",
        ),
        ("health", "ListMaintenanceOperations", health_pb2.ListMaintenanceOperationsRequest(target=NUL), "target"),
        (
            "health",
            "ListMaintenanceOperations",
            health_pb2.ListMaintenanceOperationsRequest(page_token="x"),
            "page_token",
        ),
    ]


CASE_IDS = [f"{service}.{method}:{field}" for service, method, _, field in _cases("u")]


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
async def test_hostile_fields_are_invalid_argument_and_write_nothing(channel, db, index: int) -> None:
    uid = unique("hx")
    service, method, request, field = _cases(uid)[index]
    stubs = {
        "prefs": preferences_pb2_grpc.PreferencesServiceStub(channel),
        "ai": ai_config_pb2_grpc.AIConfigServiceStub(channel),
        "audit": audit_pb2_grpc.AuditServiceStub(channel),
        "health": health_pb2_grpc.HealthServiceStub(channel),
    }
    before = await rows_everywhere(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(stubs[service], method)(request, metadata=SERVICE if method == "RecordUsage" else ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    violations = field_violations(err.value)
    assert names(violations, field), violations
    assert await rows_everywhere(db) == before


BASE64URL = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"


async def test_cursor_spellings_the_server_never_issued_are_refused(channel) -> None:
    stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
    uid = unique("hc")
    first = await stub.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(subject=subject(uid)), metadata=ADMIN
    )
    real = first.cursor.token
    body, _, mac = real.partition(".")

    def other(char: str) -> str:
        return "B" if char == "A" else "A"

    forged = [
        " 5",
        "1_0",
        "x" * 5000,
        f"{body}.{mac[:-2]}{other(mac[-2])}{mac[-1]}",
        f"{body[:-2]}{other(body[-2])}{body[-1]}.{mac}",
        # The same MAC bytes spelled with an unused trailing bit set: not the spelling the server issued.
        f"{body}.{mac[:-1]}{BASE64URL[BASE64URL.index(mac[-1]) | 1]}",
        "9" * 40,
    ]
    for token in forged:
        call = stub.WatchPreferences(
            preferences_pb2.WatchPreferencesRequest(subject=subject(uid), start_cursor=common_pb2.Cursor(token=token)),
            metadata=ADMIN,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (token, err.value.details())
        assert names(field_violations(err.value), "start_cursor")
    call = stub.WatchPreferences(
        preferences_pb2.WatchPreferencesRequest(subject=subject(uid), start_cursor=common_pb2.Cursor(token=real)),
        metadata=ADMIN,
    )
    assert (await call.read()).HasField("started")
    call.cancel()


async def test_an_edited_page_token_is_refused(channel) -> None:
    stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
    page = await stub.ListDefinitions(preferences_pb2.ListDefinitionsRequest(page_size=2), metadata=ADMIN)
    assert page.next_page_token
    await stub.ListDefinitions(
        preferences_pb2.ListDefinitionsRequest(page_size=2, page_token=page.next_page_token), metadata=ADMIN
    )
    body, _, mac = page.next_page_token.partition(".")
    edited = json_format.MessageToJson(struct_pb2.Value(string_value=body))  # any other body under the same mac
    flipped = ("B" if body[0] == "A" else "A") + body[1:]
    for token in (f"{flipped}.{mac}", f"{edited}.{mac}"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListDefinitions(
                preferences_pb2.ListDefinitionsRequest(page_size=2, page_token=token), metadata=ADMIN
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in field_violations(err.value)


async def test_a_budget_at_its_bound_keeps_accounting_working(channel) -> None:
    stub = ai_config_pb2_grpc.AIConfigServiceStub(channel)
    uid = unique("hb")
    mine = auth("user", sub=uid)
    await stub.CreateAIConfig(
        ai_config_pb2.CreateAIConfigRequest(
            config=ai_config_pb2.AIConfig(
                name="big",
                user_id=uid,
                active=True,
                configuration=ai_config_pb2.AIConfiguration(
                    cost_budget=ai_config_pb2.CostBudget(daily_usd=1e9, weekly_usd=1e9, monthly_usd=1e9)
                ),
            )
        ),
        metadata=mine,
    )
    recorded = await stub.RecordUsage(
        ai_config_pb2.RecordUsageRequest(
            subject=subject(uid),
            model="claude-3-haiku-20240307",
            input_tokens=1_000_000_000,
            output_tokens=1_000_000_000,
            request_id="max-1",
        ),
        metadata=SERVICE,
    )
    assert recorded.recorded
    status = await stub.GetBudgetStatus(ai_config_pb2.GetBudgetStatusRequest(subject=subject(uid)), metadata=mine)
    assert any(p.spent_nanos == recorded.cost_nanos for p in status.periods), status


async def test_the_deepest_accepted_value_reads_back_through_every_path(channel, db) -> None:
    """A JSON value at the depth limit under a key with the most segments encodes in effective reads,
    batch reads, `nested`, watch messages, the history and the export."""
    prefs = preferences_pb2_grpc.PreferencesServiceStub(channel)
    audit = audit_pb2_grpc.AuditServiceStub(channel)
    segments = [f"s{i}" for i in range(MAX_KEY_SEGMENTS)]
    key = ".".join([unique("deep"), *segments[1:]])
    await prefs.CreateDefinition(
        preferences_pb2.CreateDefinitionRequest(
            definition=preferences_pb2.Definition(
                key=key,
                category="probe",
                type=common_pb2.VALUE_TYPE_JSON,
                default_value=tv({}),
                overridable_scopes=[common_pb2.SCOPE_KIND_GLOBAL, common_pb2.SCOPE_KIND_USER],
            )
        ),
        metadata=ADMIN,
    )
    uid = unique("hd")
    watch = prefs.WatchPreferences(preferences_pb2.WatchPreferencesRequest(subject=subject(uid)), metadata=ADMIN)
    assert (await watch.read()).HasField("started")
    value = deep_json(MAX_JSON_DEPTH - 1)
    await prefs.SetPreferences(
        set_request(common_pb2.Scope(kind=common_pb2.SCOPE_KIND_GLOBAL), {key: value}), metadata=ADMIN
    )
    effective = await prefs.GetEffectivePreferences(
        preferences_pb2.GetEffectivePreferencesRequest(subject=subject(uid)), metadata=ADMIN
    )
    by_key = {v.key: v for v in effective.values}
    assert json_format.MessageToDict(by_key[key].value.json_value) == value
    batch = await prefs.BatchGetEffectivePreferences(
        preferences_pb2.BatchGetEffectivePreferencesRequest(subjects=[subject(uid)]), metadata=ADMIN
    )
    assert any(v.key == key for v in batch.results[0].values)
    async with asyncio.timeout(10):
        while not (message := await watch.read()).HasField("change"):
            pass
    assert message.change.key == key
    watch.cancel()
    history = await audit.ListChanges(
        audit_pb2.ListChangesRequest(key_prefix=key, kinds=[common_pb2.CHANGE_KIND_PREFERENCE], page_size=5),
        metadata=ADMIN,
    )
    assert json_format.MessageToDict(history.changes[0].new_value) == value
    await prefs.SetPreferences(set_request(user(uid), {key: value}), metadata=ADMIN)
    exported = await audit.ExportUserData(audit_pb2.ExportUserDataRequest(user_id=uid), metadata=ADMIN)
    assert exported.ByteSize() > 0
    # A value one level deeper is refused before it is stored.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await prefs.SetPreferences(set_request(user(uid), {key: deep_json(MAX_JSON_DEPTH)}), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


async def test_a_request_nested_past_the_decoder_limit_is_invalid_argument(channel) -> None:
    """A JSON value nested 120 lists deep (built as bytes: no protobuf library would build it)."""
    value = struct_pb2.Value(number_value=1).SerializeToString()
    for _ in range(120):
        value = _field(6, _field(1, value))  # Value.list_value -> ListValue.values
    fields = preferences_pb2.SetPreferencesRequest.DESCRIPTOR.fields_by_name
    write_fields = preferences_pb2.PreferenceWrite.DESCRIPTOR.fields_by_name
    json_number = common_pb2.TypedValue.DESCRIPTOR.fields_by_name["json_value"].number
    struct = _field(1, _field(1, b"a") + _field(2, value))  # Struct.fields entry {key, value}
    write = _field(write_fields["key"].number, b"notifications.trading.event_rules") + _field(
        write_fields["value"].number, _field(json_number, struct)
    )
    raw = user_scope_bytes = preferences_pb2.SetPreferencesRequest(scope=user("deep")).SerializeToString()
    raw = user_scope_bytes + _field(fields["writes"].number, write)
    call = channel.unary_unary(
        "/prefd.v1.PreferencesService/SetPreferences",
        request_serializer=lambda b: b,
        response_deserializer=preferences_pb2.SetPreferencesResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(raw, metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


async def test_an_oversized_request_is_resource_exhausted(channel) -> None:
    stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetDefinition(preferences_pb2.GetDefinitionRequest(key="x" * 100_000), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(err.value) == "REQUEST_TOO_LARGE"


READS, AI_READS = 60, 40


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_hostile_reads_leave_the_server_memory_bounded(fresh_database: Any, tmp_path: Path) -> None:
    """60 distinct 3.5 MB effective reads and 40 AI reads with a 3.5 MB unknown field, from a user token:
    the server keeps none of them."""
    env = {
        "DATABASE_URL": await fresh_database(),
        "PREFD_JWT_SECRET": SECRET,
        "PREFD_PORT": "0",
        "PREFD_HOST": "127.0.0.1",
        "PREFD_DATA_DIR": str(tmp_path),
        "PREFD_LOG_LEVEL": "WARNING",
    }
    uid = unique("hm")
    mine = auth("user", sub=uid)
    async with (
        prefd_process(env) as (proc, port, _lines),
        grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 * 1024 * 1024)]
        ) as channel,
    ):
        prefs = preferences_pb2_grpc.PreferencesServiceStub(channel)
        ai = ai_config_pb2_grpc.AIConfigServiceStub(channel)
        warm = preferences_pb2.GetEffectivePreferencesRequest(subject=subject(uid))
        for _ in range(20):
            await prefs.GetEffectivePreferences(warm, metadata=mine)
            await ai.GetEffectiveAIConfig(
                ai_config_pb2.GetEffectiveAIConfigRequest(subject=subject(uid)), metadata=mine
            )
        before = _rss_kib(proc.pid)
        codes = set()
        for i in range(READS):
            prefixes = [f"p{i}.{n:05d}.{'x' * 120}" for n in range(27_000)]
            request = preferences_pb2.GetEffectivePreferencesRequest(subject=subject(uid), key_prefixes=prefixes)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await prefs.GetEffectivePreferences(request, metadata=mine)
            codes.add(err.value.code())
        unknown_field = b"\x9a\x06" + _varint(3_500_000) + bytes(3_500_000)  # field 99, length-delimited
        raw_call = channel.unary_unary(
            "/prefd.v1.AIConfigService/GetEffectiveAIConfig",
            request_serializer=lambda b: b,
            response_deserializer=ai_config_pb2.GetEffectiveAIConfigResponse.FromString,
        )
        for i in range(AI_READS):
            body = ai_config_pb2.GetEffectiveAIConfigRequest(subject=subject(uid)).SerializeToString()
            try:
                await raw_call(body + unknown_field[:-1] + bytes([i]), metadata=mine)
            except grpc.aio.AioRpcError as error:
                codes.add(error.code())
        after = _rss_kib(proc.pid)
    print(f"server RSS before {before / 1024:.0f} MiB, after {after / 1024:.0f} MiB; codes {codes}")
    assert codes <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT}
    # What stays is native (gRPC buffers, allocator arenas), not requests: unbounded retention took +500 MiB.
    assert after - before < 128 * 1024, (before, after)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
