"""A seeded fuzzer over every unary method of every prefd service, built from the descriptors: no
answer may be UNKNOWN or INTERNAL, and a refused call must leave every table as it was.

Requests mix plausible values (catalog keys, ids and tokens harvested from earlier answers) with
hostile ones (NUL and control characters, over-long text, NaN and infinities, int64 extremes,
out-of-range timestamps, unknown enum numbers, deep JSON, oversized lists). Set PREFD_FUZZ_SEED to
replay a run and PREFD_FUZZ_CALLS for a longer one."""

from __future__ import annotations

import importlib
import math
import os
import pkgutil
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

import prefd.v1
from prefd_server.app import App
from prefd_server.statistics.store import RUNNER_LOCK_KEY
from tests.helpers.auth import auth
from tests.helpers.settings import make_settings

SEED = int(os.environ.get("PREFD_FUZZ_SEED", "20261126"))
CALLS = int(os.environ.get("PREFD_FUZZ_CALLS", "4000"))
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}

ADMIN = auth("admin", sub="fz-admin")
USER = auth("user", sub="fz-user", org="fz-org")
SERVICE = auth("service", sub="fz-service")

HOSTILE_STRINGS = [
    "",
    "a\x00b",
    "\x00",
    "carol\n",
    "probe.nl\n",
    " 5",
    "1_0",
    "\x1b[31mred",
    "x" * 129,
    "y" * 5000,
    "é" * 3000,
    "💥",
    "'; DROP TABLE changes; --",
    "../../etc/passwd",
    "%s%n",
    "abc",
    "x",
    "9" * 30,
    "-1",
]
HOSTILE_INTS = [0, -1, 1, 2**31 - 1, -(2**31), 2**53, 2**63 - 1, -(2**63), 10**18]
HOSTILE_DOUBLES = [math.nan, math.inf, -math.inf, 1e19, 1e308, -1e308, -0.0, 5e-324, 1e15 + 1]
BAD_TIMES = [(253402300800, 0), (0, 1_000_000_000), (-62135596801, 0), (2**62, 0), (0, -1)]

PLAUSIBLE: dict[str, list[Any]] = {
    "user_id": ["fz-user", "fz-other", "fz-user"],
    "org_id": ["fz-org", "fz-org", ""],
    "key": [
        "display.theme",
        "ui.theme",
        "locale.timezone",
        "display.items_per_page",
        "notifications.email.enabled",
        "notifications.trading.event_rules",
        "risk_management.max_position_size_percent",
        "fz.custom",
    ],
    "key_prefix": ["display", "ui.", "ai_config/", ""],
    "key_prefixes": ["display", "ui.", "locale"],
    "category": ["display", "risk_management", "fz"],
    "categories": ["display", "risk_management"],
    "name": ["fz-config", "fz-second", "claude-3-haiku-20240307"],
    "model": ["claude-3-haiku-20240307", "claude-3-5-sonnet-20241022", "fz-model"],
    "reason": ["fuzzing", ""],
    "request_id": ["fz-req-1", "fz-req-2"],
    "target": ["fz_not_a_table", "pg_class"],
    "paths": ["priority", "configuration.model.temperature", "description", "active", "configuration.retry"],
    "primary": ["sk-fuzz-0000000000001234"],
    "secondary": ["sk-fuzz-0000000000005678"],
    "string_value": ["dark", "light", "Europe/Paris"],
    "description": ["a definition made by the fuzzer"],
    "actor": ["fz-admin", "fz-user"],
    "start_date": ["2026-01-01", "2026-11-26", "2026-02-30"],
    "end_date": ["2026-01-31", "2026-11-27", "2027-12-31"],
}
# Values harvested from successful answers (ids, tokens, cursors), by field name.
HARVESTED_FIELDS = {"id", "page_token", "next_page_token", "token", "preview_token", "change_id", "config_id"}
HARVEST_ALIASES = {"next_page_token": "page_token", "config_id": "id"}


NOW = "2026-01-01T00:00:00Z"
USER_SCOPE = {"kind": "SCOPE_KIND_USER", "id": "fz-user"}
ORG_SCOPE = {"kind": "SCOPE_KIND_ORG", "id": "fz-org"}
SUBJECT = {"user_id": "fz-user", "org_id": "fz-org"}
# Valid requests that mutation starts from, so that odd values reach past the handlers' first checks.
TEMPLATES: dict[str, list[dict[str, Any]]] = {
    "SetPreferences": [
        {"scope": USER_SCOPE, "writes": [{"key": "display.theme", "value": {"string_value": "dark"}}], "reason": "r"},
        {
            "scope": ORG_SCOPE,
            "writes": [
                {"key": "locale.timezone", "value": {"string_value": "Asia/Tokyo"}},
                {"key": "notifications.trading.event_rules", "value": {"json_value": {"LARGE_LOSS": {"min": 1000}}}},
            ],
            "reason": "r",
        },
        {
            "scope": ORG_SCOPE,
            "writes": [
                {
                    "key": "display.theme",
                    "rollout": {
                        "variants": [
                            {"name": "a", "value": {"string_value": "dark"}, "weight": 50},
                            {"name": "b", "value": {"string_value": "light"}, "weight": 50},
                        ],
                        "salt": "fz",
                        "bucket_by": "ROLLOUT_BUCKET_BY_USER_ID",
                    },
                    "policy": {"enforced": True, "allowed_values": [{"string_value": "dark"}]},
                },
                {"key": "display.items_per_page", "value": {"int_value": 20}, "policy": {"max_value": 50}},
            ],
            "reason": "r",
        },
    ],
    "DeletePreferences": [{"scope": USER_SCOPE, "keys": ["display.theme"], "reason": "r"}],
    "ResetPreferences": [{"scope": USER_SCOPE, "category": "display", "reason": "r"}],
    "CreateDefinition": [
        {
            "definition": {
                "key": "fz.custom",
                "category": "fz",
                "description": "d",
                "type": "VALUE_TYPE_DOUBLE",
                "default_value": {"double_value": 1},
                "min_value": 0,
                "max_value": 10,
                "overridable_scopes": ["SCOPE_KIND_USER"],
            }
        },
        {
            "definition": {
                "key": "fz.blob",
                "category": "fz",
                "type": "VALUE_TYPE_JSON",
                "default_value": {"json_value": {"a": 1}},
                "overridable_scopes": ["SCOPE_KIND_USER", "SCOPE_KIND_ORG"],
            }
        },
    ],
    "UpdateDefinition": [
        {"definition": {"key": "fz.custom", "description": "e"}, "update_mask": "description"},
    ],
    "CreateAIConfig": [
        {
            "config": {
                "name": "fz-config",
                "user_id": "fz-user",
                "priority": 1,
                "active": True,
                "configuration": {
                    "model": {"model": "claude-3-haiku-20240307", "temperature": 0.5},
                    "cost_budget": {"daily_usd": 1, "weekly_usd": 5, "monthly_usd": 20},
                    "retry": {"max_retries": 2, "base_delay_ms": 100, "max_delay_ms": 1000},
                },
            },
            "reason": "r",
        }
    ],
    "UpdateModel": [
        {
            "model": {
                "model": "fz-model",
                "context_window": 1000,
                "output_limit": 100,
                "input_usd_per_1k": 0.001,
                "output_usd_per_1k": 0.002,
                "features": ["chat"],
            },
            "reason": "r",
        }
    ],
    "EstimateCost": [{"model": "claude-3-haiku-20240307", "input_tokens": 1200, "output_tokens": 800}],
    "RecordUsage": [
        {
            "subject": SUBJECT,
            "model": "claude-3-haiku-20240307",
            "input_tokens": 1200,
            "output_tokens": 800,
            "request_id": "fz-req-1",
        }
    ],
    "GetEffectivePreferences": [{"subject": SUBJECT, "key_prefixes": ["display"]}],
    "BatchGetEffectivePreferences": [{"subjects": [SUBJECT], "categories": ["display"]}],
    "ListChanges": [{"scope": USER_SCOPE, "start_time": NOW, "page_size": 5}],
    "DiffScope": [{"scope": USER_SCOPE, "from": {"time": NOW}, "to": {"change_id": 1}}],
    "PreviewRollback": [{"target": {"scopes": [USER_SCOPE, ORG_SCOPE], "to": {"time": NOW}, "org_id": "fz-org"}}],
    "Rollback": [{"target": {"scopes": [USER_SCOPE], "to": {"change_id": 1}}, "reason": "r"}],
    "ExportUserData": [{"user_id": "fz-user", "org_id": "fz-org"}],
    "EraseUserData": [{"user_id": "fz-gone", "reason": "r"}],
    "ListDefinitions": [{"category": "display", "page_size": 3}],
    "ListMaintenanceOperations": [{"target": "changes", "page_size": 2}],
    "Decide": [
        {
            "subject": SUBJECT,
            "event": {
                "event_type": "LARGE_LOSS",
                "category": "trading",
                "priority": "PRIORITY_HIGH",
                "data": {"loss_amount": 2500, "symbol": "AAPL"},
                "at": NOW,
                "channels": ["CHANNEL_EMAIL", "CHANNEL_SMS"],
            },
            "consume": True,
            "idempotency_key": "fz-idem-1",
        }
    ],
    "DecideBatch": [
        {
            "subjects": [SUBJECT, {"user_id": "fz-user-2", "org_id": "fz-org"}],
            "event": {"event_type": "generation_complete", "category": "generation_complete"},
        }
    ],
    "GrantConsent": [
        {
            "user_id": "fz-user",
            "purpose": "marketing_email",
            "legal_basis": "LEGAL_BASIS_CONSENT",
            "source": "signup_form",
            "notice_version": "v1",
        }
    ],
    "WithdrawConsent": [{"user_id": "fz-user", "purpose": "marketing_email", "source": "settings_page"}],
    "ListConsents": [{"user_id": "fz-user"}],
    "ListConsentHistory": [{"user_id": "fz-user", "purpose": "marketing_email", "page_size": 2}],
    "CreateTemplate": [
        {
            "template": {
                "name": "fz-tpl",
                "scope_kind": "SCOPE_KIND_USER",
                "values": [{"key": "display.theme", "value": {"string_value": "dark"}}],
            }
        }
    ],
    "UpdateTemplate": [
        {
            "template": {
                "name": "fz-tpl",
                "scope_kind": "SCOPE_KIND_USER",
                "description": "d",
                "values": [{"key": "display.items_per_page", "value": {"int_value": 25}}],
            },
            "expected_version": 1,
        }
    ],
    "GetTemplate": [{"name": "fz-tpl"}],
    "ListTemplates": [{"page_size": 2}],
    "DeleteTemplate": [{"name": "fz-tpl"}],
    "ApplyTemplate": [{"name": "fz-tpl", "scope": USER_SCOPE, "dry_run": True, "reason": "r"}],
    "GetKeyStatistics": [
        {"key": "display.theme", "scope_kind": "SCOPE_KIND_USER", "top_n": 3},
        {"key": "notifications.sms.phone_number"},
    ],
    "GetCategoryStatistics": [{"category": "display", "scope_kind": "SCOPE_KIND_ORG"}],
    "GetAdoption": [{"key": "locale.timezone"}],
    "ListDailyRollups": [{"key": "display.theme", "start_date": "2026-01-01", "end_date": "2026-01-31"}],
}


def services() -> list[ServiceDescriptor]:
    """Every service in the prefd.v1 package, as generated (a new service joins by existing)."""
    found = []
    for module_info in pkgutil.iter_modules(prefd.v1.__path__):
        if module_info.name.endswith("_pb2"):
            module = importlib.import_module(f"prefd.v1.{module_info.name}")
            found.extend(module.DESCRIPTOR.services_by_name.values())
    return sorted(found, key=lambda s: s.full_name)


def unary_methods() -> list[MethodDescriptor]:
    return [m for s in services() for m in s.methods if not m.client_streaming and not m.server_streaming]


class RequestMaker:
    """Random requests for a method from its input descriptor."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.harvest: dict[str, list[Any]] = {}
        self.hostility = 0.25

    def request(self, method: MethodDescriptor) -> Message:
        """A template of the method with one or two values made odd, or a request built at random."""
        templates = TEMPLATES.get(method.name)
        if templates and self.rng.random() < 0.6:
            message = json_format.ParseDict(
                self.rng.choice(templates), message_factory.GetMessageClass(method.input_type)()
            )
            for _ in range(self.rng.randint(1, 2)):
                self.mutate(message)
            return message
        # Mostly-plausible requests reach the handlers' own rules with odd values here and there;
        # hostile ones test the input layer.
        self.hostility = self.rng.choice([0.02, 0.05, 0.1, 0.3])
        message = message_factory.GetMessageClass(method.input_type)()
        self.fill(message, 0)
        return message

    def mutate(self, message: Message) -> None:
        """Replace one set scalar somewhere in `message` by a hostile value (or fill a random field)."""
        scalars: list[tuple[Message, FieldDescriptor, int | None]] = []

        def walk(node: Message) -> None:
            for field, value in node.ListFields():
                if field.message_type is not None and field.message_type.GetOptions().map_entry:
                    continue
                if field.message_type is not None:
                    for item in value if field.is_repeated else [value]:
                        walk(item)
                elif field.is_repeated:
                    scalars.extend((node, field, i) for i in range(len(value)))
                else:
                    scalars.append((node, field, None))

        walk(message)
        if not scalars or self.rng.random() < 0.15:
            self.hostility = 0.5
            self.fill(message, 1)
            return
        node, field, index = self.rng.choice(scalars)
        self.hostility = 1.0
        value = self.scalar(field)
        if index is None:
            setattr(node, field.name, value)
        else:
            getattr(node, field.name)[index] = value

    def fill(self, message: Message, depth: int) -> None:
        name = message.DESCRIPTOR.full_name
        if name == "google.protobuf.Timestamp" or name == "google.protobuf.Duration":
            seconds, nanos = self.rng.choice(BAD_TIMES) if self.rng.random() < 0.3 else (int(time.time()) - 3600, 0)
            message.seconds, message.nanos = seconds, nanos  # type: ignore[attr-defined]
            return
        if name == "google.protobuf.Struct":
            message.update(self.json_object(self.deep_depth()))  # type: ignore[attr-defined]
            return
        if name == "google.protobuf.Value":
            message.struct_value.update(self.json_object(self.deep_depth()))  # type: ignore[attr-defined]
            return
        if name == "google.protobuf.FieldMask":
            message.paths.extend(self.rng.sample(PLAUSIBLE["paths"], self.rng.randint(0, 2)))  # type: ignore[attr-defined]
            if self.rng.random() < 0.2:
                message.paths.append(self.rng.choice(HOSTILE_STRINGS))  # type: ignore[attr-defined]
            return
        chance = 0.75 if depth == 0 else 0.5
        for field in message.DESCRIPTOR.fields:
            if self.rng.random() > chance:
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                container = getattr(message, field.name)
                for _ in range(self.rng.randint(0, 2)):
                    key = self.scalar(field.message_type.fields_by_name["key"])
                    value_field = field.message_type.fields_by_name["value"]
                    if value_field.message_type is not None:
                        self.fill(container[key], depth + 1)
                    else:
                        container[key] = self.scalar(value_field)
            elif field.is_repeated:
                count = self.rng.choice([0, 1, 1, 2, 3])
                if self.rng.random() < 0.02:
                    count = self.rng.choice([70, 600, 1100])
                container = getattr(message, field.name)
                for _ in range(count):
                    if field.message_type is not None:
                        if depth < 5:
                            self.fill(container.add(), depth + 1)
                    else:
                        container.append(self.scalar(field))
            elif field.message_type is not None:
                if depth < 5:
                    self.fill(getattr(message, field.name), depth + 1)
            else:
                setattr(message, field.name, self.scalar(field))

    def deep_depth(self) -> int:
        return self.rng.choice([0, 1, 2, 3, 17, 31, 40]) if self.rng.random() < 0.3 else self.rng.randint(0, 2)

    def json_object(self, depth: int) -> dict[str, Any]:
        if depth <= 0:
            return {self.json_key(): self.json_leaf() for _ in range(self.rng.randint(0, 3))}
        return {self.json_key(): self.json_object(depth - 1)}

    def json_key(self) -> str:
        return self.rng.choice(["a", "channel", "min", "x\x00y", "k" * 300]) if self.rng.random() < 0.2 else "k"

    def json_leaf(self) -> Any:
        choice = self.rng.random()
        if choice < 0.3:
            return self.rng.choice([1.5, 1000, -3, math.nan, math.inf, 1e308])
        if choice < 0.6:
            return self.rng.choice(["EMAIL", "x\x00", "z" * 5000, ""])
        if choice < 0.8:
            return self.rng.choice([True, False, None])
        return [self.rng.choice([1, "a", None]) for _ in range(self.rng.randint(0, 3))]

    def scalar(self, field: FieldDescriptor) -> Any:
        rng = self.rng
        kind = field.type
        hostile = rng.random() < self.hostility
        if kind == FieldDescriptor.TYPE_STRING:
            pool = self.harvest.get(self.pool_name(field.name, str)) or PLAUSIBLE.get(field.name)
            if hostile or not pool:
                return rng.choice(HOSTILE_STRINGS)
            return str(rng.choice(pool))
        if kind == FieldDescriptor.TYPE_BYTES:
            return rng.choice([b"", b"\x00\xff", b"x" * 5000])
        if kind == FieldDescriptor.TYPE_BOOL:
            return rng.random() < 0.5
        if kind == FieldDescriptor.TYPE_ENUM:
            assert field.enum_type is not None
            numbers = [v.number for v in field.enum_type.values]
            return rng.choice([0, 99, 2**31 - 1]) if hostile else rng.choice(numbers)
        if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            value = rng.choice(HOSTILE_DOUBLES) if hostile else rng.choice([0.0, 0.25, 0.5, 1.0, 2.0, 10.0, 100.0])
            return value if kind == FieldDescriptor.TYPE_DOUBLE or not math.isfinite(value) else min(value, 3e38)
        pool = self.harvest.get(self.pool_name(field.name, int))
        if pool and not hostile and rng.random() < 0.7:
            value = rng.choice(pool)
        else:
            value = rng.choice(HOSTILE_INTS) if hostile else rng.choice([0, 1, 2, 5, 10, 100, 1000])
        bits = 32 if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32) else 64
        unsigned = kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED32)
        unsigned = unsigned or kind == FieldDescriptor.TYPE_FIXED64
        if unsigned:
            return abs(int(value)) % (2**bits)
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return max(low, min(high, int(value)))

    @staticmethod
    def pool_name(field_name: str, kind: type) -> str:
        return f"{HARVEST_ALIASES.get(field_name, field_name)}:{'text' if kind is str else 'number'}"

    def collect(self, message: Message) -> None:
        """Remember ids, tokens and cursors a successful answer carried, for later requests."""
        for field, value in message.ListFields():
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                continue
            if field.message_type is not None:
                for item in value if field.is_repeated else [value]:
                    self.collect(item)
            elif field.name in HARVESTED_FIELDS and not field.is_repeated and value:
                pool = self.harvest.setdefault(self.pool_name(field.name, type(value)), [])
                if value not in pool:
                    pool.append(value)
                    del pool[:-40]


async def table_fingerprint(conn: asyncpg.Connection) -> dict[str, str]:
    """Row count and content hash of every table of prefd's schema."""
    tables = await conn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
    )
    parts = [
        f"SELECT '{t['table_name']}' AS name, "
        f"count(*)::text || ':' || coalesce(sum(hashtext(x::text)), 0)::text AS print "
        f'FROM "{t["table_name"]}" x'
        for t in tables
    ]
    rows = await conn.fetch(" UNION ALL ".join(parts))
    return {r["name"]: r["print"] for r in rows}


@pytest.fixture
async def fuzz_app(fresh_database: Any, tmp_path: Path) -> AsyncIterator[App]:
    dsn = await fresh_database()
    # This connection holds the statistics runner's lock, as another process would, so the server's runner
    # stands by: its background writes would otherwise show up between two fingerprints.
    runner_lock = await asyncpg.connect(dsn)
    try:
        assert await runner_lock.fetchval("SELECT pg_try_advisory_lock($1)", RUNNER_LOCK_KEY)
        async with App(make_settings(dsn, tmp_path)) as app:
            yield app
    finally:
        await runner_lock.close()


async def test_every_unary_method_answers_hostile_requests_cleanly(fuzz_app: App) -> None:
    rng = random.Random(SEED)
    maker = RequestMaker(rng)
    methods = unary_methods()
    assert len(methods) >= 30, [m.full_name for m in methods]
    codes: Counter[str] = Counter()
    by_method: dict[str, Counter[str]] = {}
    failures: list[str] = []
    began = time.monotonic()
    conn = await asyncpg.connect(fuzz_app.dsn)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{fuzz_app.port}") as channel:
            for n in range(CALLS):
                method = methods[n % len(methods)]
                request = maker.request(method)
                response_class = message_factory.GetMessageClass(method.output_type)
                call = channel.unary_unary(
                    f"/{method.containing_service.full_name}/{method.name}",
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=response_class.FromString,
                )
                metadata = rng.choices([ADMIN, USER, SERVICE], weights=[6, 3, 1])[0]
                before = await table_fingerprint(conn)
                try:
                    answer = await call(request, metadata=metadata, timeout=10)
                    code = grpc.StatusCode.OK
                    maker.collect(answer)
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                    if code in FORBIDDEN:
                        failures.append(f"{method.full_name} -> {code.name} {error.details()!r}: {request!r:.600}")
                    else:
                        after = await table_fingerprint(conn)
                        changed = sorted(t for t in after if after[t] != before.get(t))
                        if changed:
                            failures.append(f"{method.full_name} refused {code.name} but wrote {changed}")
                codes[code.name] += 1
                by_method.setdefault(method.full_name, Counter())[code.name] += 1
    finally:
        await conn.close()
    elapsed = time.monotonic() - began
    print(f"fuzz seed={SEED} calls={CALLS} in {elapsed:.1f} s: {dict(codes.most_common())}")
    assert not failures, f"seed {SEED}: {len(failures)} bad answers:\n" + "\n".join(failures[:25])
    # Every method was reached, and the mix reached past the input checks into the handlers.
    assert set(by_method) == {m.full_name for m in methods}
    assert codes["OK"] >= CALLS // 20, codes
    assert codes["INVALID_ARGUMENT"] >= CALLS // 10, codes
