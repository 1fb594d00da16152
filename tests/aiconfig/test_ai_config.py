"""AIConfigService named configs: the fallback chain with provenance, priorities, validation, permissions.

The helpers shared with the other AI tests (flat <-> protobuf configurations, row counts, error details)
live in tests/helpers/aiconfig.py.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefd.v1 import ai_config_pb2 as ai
from prefd.v1 import ai_config_pb2_grpc, common_pb2
from prefd_server.app import App
from tests.helpers.aiconfig import (
    ADMIN,
    BACKOFFS,
    DEFAULT_SOURCE,
    DEFAULTS,
    ENV_SOURCE,
    FIELDS,
    HAIKU,
    OPUS,
    ROTATIONS,
    SEEDED_MODELS,
    bad_request,
    config_message,
    config_source,
    configuration,
    create_config,
    delete_quietly,
    flat,
    get_effective,
    masked,
    new_key,
    provenance_tuple,
    row_counts,
)
from tests.helpers.auth import auth, unique
from tests.helpers.processes import prefd_process
from tests.helpers.requests import error_reason, field_violations
from tests.helpers.settings import MASTER_KEY, make_settings, process_env

# --- the chain for every combination of layers -------------------------------------------------

ENV_API_KEY = new_key("sk-env-")
ENV_VALUES: dict[str, Any] = {"model.model": HAIKU, "model.temperature": 0.2, "model.max_tokens": 1000}
ENV_OVERRIDES: dict[str, Any] = dict(ai_model=HAIKU, ai_temperature=0.2, ai_max_tokens=1000, ai_api_key=ENV_API_KEY)


@pytest.fixture(scope="module")
async def chain_stubs(
    fresh_database: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[bool, ai_config_pb2_grpc.AIConfigServiceStub]]:
    """Two private servers on their own databases (their GLOBAL scope is ours alone): without and with
    the ENV layer. Keyed by whether the ENV layer is present."""
    plain_url, env_url = await fresh_database(), await fresh_database()
    async with (
        App(make_settings(plain_url, tmp_path_factory.mktemp("plain"))) as plain,
        App(make_settings(env_url, tmp_path_factory.mktemp("env"), **ENV_OVERRIDES)) as env,
        grpc.aio.insecure_channel(f"127.0.0.1:{plain.port}") as plain_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{env.port}") as env_channel,
    ):
        yield {
            False: ai_config_pb2_grpc.AIConfigServiceStub(plain_channel),
            True: ai_config_pb2_grpc.AIConfigServiceStub(env_channel),
        }


_fraction = st.integers(0, 100).map(lambda i: i / 100)
SCALAR_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "model.model": st.sampled_from(SEEDED_MODELS),
    "model.temperature": _fraction,
    "model.max_tokens": st.integers(1, 4096),
    "model.top_p": _fraction,
    "model.streaming": st.booleans(),
    "rate_limiting.requests_per_minute": st.integers(1, 10_000),
    "rate_limiting.concurrent_requests": st.integers(1, 64),
    "rate_limiting.burst_allowance": st.integers(0, 100),
    "retry.max_retries": st.integers(0, 10),
    "retry.backoff": st.sampled_from(sorted(BACKOFFS)),
    "cost_budget.alert_thresholds": st.lists(st.integers(1, 100), min_size=1, max_size=4, unique=True).map(
        lambda xs: [x / 100 for x in sorted(xs)]
    ),
    "timeouts.generation_ms": st.integers(1, 600_000),
    "timeouts.connection_ms": st.integers(1, 60_000),
    "timeouts.total_ms": st.integers(1, 1_200_000),
    "api_keys.rotation_schedule": st.sampled_from(sorted(ROTATIONS)),
}
# Fields under a cross-field rule are set together by a layer, so every merged chain is valid.
DELAYS = st.tuples(st.integers(0, 20_000), st.integers(0, 50_000)).map(
    lambda t: {"retry.base_delay_ms": t[0], "retry.max_delay_ms": t[0] + t[1]}
)
BUDGETS = st.tuples(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(0, 10_000)).map(
    lambda t: {
        "cost_budget.daily_usd": t[0] / 100,
        "cost_budget.weekly_usd": (t[0] + t[1]) / 100,
        "cost_budget.monthly_usd": (t[0] + t[1] + t[2]) / 100,
    }
)


@st.composite
def layer_spec(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """One config layer: the fields it sets, and whether it carries an API key."""
    paths = draw(st.sets(st.sampled_from(sorted(SCALAR_VALUES))))
    values = {path: draw(SCALAR_VALUES[path]) for path in sorted(paths)}
    if draw(st.booleans()):
        values.update(draw(DELAYS))
    if draw(st.booleans()):
        values.update(draw(BUDGETS))
    return values, draw(st.booleans())


def expected_chain(
    env_present: bool, layers: list[tuple[int, ai.AIConfig, dict[str, Any], str | None]]
) -> tuple[dict[str, Any], dict[str, tuple[Any, ...]], tuple[str, tuple[Any, ...]] | None]:
    """Values, per-field sources and the (key, source) unit the spec's chain gives."""
    values, sources = dict(DEFAULTS), dict.fromkeys(DEFAULTS, DEFAULT_SOURCE)
    key: tuple[str, tuple[Any, ...]] | None = None
    if env_present:
        values.update(ENV_VALUES)
        sources.update(dict.fromkeys(ENV_VALUES, ENV_SOURCE))
        key = (ENV_API_KEY, ENV_SOURCE)
    for layer, config, layer_values, layer_key in layers:
        values.update(layer_values)
        sources.update(dict.fromkeys(layer_values, config_source(layer, config)))
        if layer_key is not None:
            key = (layer_key, config_source(layer, config))
    return values, sources, key


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.fixed_dictionaries({"GLOBAL": layer_spec(), "ORG": layer_spec(), "USER": layer_spec()}))
async def test_chain_takes_each_field_from_the_most_specific_layer_for_every_combination(chain_stubs, spec) -> None:
    """All 16 presence combinations of ENV, GLOBAL, ORG, USER per example, with drawn values per layer."""

    async def make(stub: Any, layer: str, owner: str) -> tuple[int, ai.AIConfig, dict[str, Any], str | None]:
        values, has_key = spec[layer]
        key = new_key() if has_key else None
        kwargs: dict[str, Any] = {"GLOBAL": {"is_global": True}, "ORG": {"org_id": owner}, "USER": {"user_id": owner}}[
            layer
        ]
        config = await create_config(stub, values=values, keys={"primary": key} if key else None, **kwargs)
        assert config.version == 1 and config.id
        number = {"GLOBAL": common_pb2.LAYER_GLOBAL, "ORG": common_pb2.LAYER_ORG, "USER": common_pb2.LAYER_USER}
        return number[layer], config, values, key

    for env_present, stub in chain_stubs.items():
        subjects = []
        for org_present, user_present in itertools.product([False, True], repeat=2):
            uid, oid = unique("u"), unique("o")
            layers = []
            if org_present:
                layers.append(await make(stub, "ORG", oid))
            if user_present:
                layers.append(await make(stub, "USER", uid))
            subjects.append((uid, oid, layers))
        for global_present in (False, True):
            global_layer = await make(stub, "GLOBAL", "") if global_present else None
            try:
                for uid, oid, layers in subjects:
                    chain = ([global_layer] if global_layer else []) + layers
                    values, sources, key = expected_chain(env_present, chain)
                    reply = await get_effective(stub, uid, oid)
                    combo = (env_present, global_present, [layer for layer, *_ in layers])
                    assert flat(reply.configuration) == values, combo
                    for path in FIELDS:
                        assert provenance_tuple(reply.provenance[path]) == sources[path], (combo, path)
                    keys = reply.configuration.api_keys
                    if key is None:
                        assert not keys.HasField("primary") and "api_keys.primary" not in reply.provenance, combo
                    else:
                        assert (keys.primary, keys.key_version) == (masked(key[0]), 1), combo
                        assert provenance_tuple(reply.provenance["api_keys.primary"]) == key[1], combo
                        assert provenance_tuple(reply.provenance["api_keys.key_version"]) == key[1], combo
                    assert list(reply.violations) == [] and reply.cursor.token, combo
            finally:
                if global_layer is not None:
                    await delete_quietly(stub, global_layer[1].id)


async def test_env_layer_is_read_once_at_start(chain_stubs, monkeypatch) -> None:
    stub = chain_stubs[True]
    uid = unique("u")
    before = await get_effective(stub, uid)
    monkeypatch.setenv("PREFD_AI_TEMPERATURE", "0.9")
    monkeypatch.setenv("PREFD_AI_MODEL", OPUS)
    monkeypatch.setenv("PREFD_AI_API_KEY", new_key())
    after = await get_effective(stub, uid)
    assert flat(before.configuration) == flat(after.configuration)
    assert (after.configuration.model.model, after.configuration.model.temperature) == (HAIKU, 0.2)
    assert after.configuration.api_keys.primary == masked(ENV_API_KEY)
    assert after.provenance["model.temperature"].layer == common_pb2.LAYER_ENV


async def test_env_layer_comes_from_prefd_ai_environment_variables(fresh_database) -> None:
    url = await fresh_database()
    env_key = new_key("sk-proc-")
    env = process_env(
        url,
        PREFD_SECRET_KEY=MASTER_KEY,
        PREFD_AI_MODEL=OPUS,
        PREFD_AI_TEMPERATURE="0.35",
        PREFD_AI_MAX_TOKENS="2048",
        PREFD_AI_API_KEY=env_key,
    )
    async with prefd_process(env) as (_proc, port, lines), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ai_config_pb2_grpc.AIConfigServiceStub(channel)
        reply = await get_effective(stub, unique("u"))
        model = reply.configuration.model
        assert (model.model, model.temperature, model.max_tokens) == (OPUS, 0.35, 2048)
        assert model.top_p == DEFAULTS["model.top_p"]
        for path in ("model.model", "model.temperature", "model.max_tokens", "api_keys.primary"):
            assert provenance_tuple(reply.provenance[path]) == ENV_SOURCE, path
        assert provenance_tuple(reply.provenance["model.top_p"]) == DEFAULT_SOURCE
        assert reply.configuration.api_keys.primary == masked(env_key)
        assert env_key not in "".join(lines)


# --- priorities and inactive configs -----------------------------------------------------------


async def test_higher_priority_wins_and_inactive_configs_do_not_count(ai_stub) -> None:
    uid, oid = unique("u"), unique("o")
    # The winner sorts first by name and is created first: only its priority makes it win.
    high = await create_config(ai_stub, org_id=oid, name="a-high", priority=10, values={"model.temperature": 0.6})
    low = await create_config(
        ai_stub, org_id=oid, name="b-low", priority=1, values={"model.temperature": 0.3, "model.top_p": 0.5}
    )
    reply = await get_effective(ai_stub, uid, oid)
    assert reply.configuration.model.temperature == 0.6
    assert provenance_tuple(reply.provenance["model.temperature"]) == config_source(common_pb2.LAYER_ORG, high)
    # A field only the lower one sets still comes from it.
    assert provenance_tuple(reply.provenance["model.top_p"]) == config_source(common_pb2.LAYER_ORG, low)

    off = await ai_stub.SetAIConfigActive(ai.SetAIConfigActiveRequest(id=high.id, active=False), metadata=ADMIN)
    assert (off.config.active, off.config.version) == (False, 2)
    reply = await get_effective(ai_stub, uid, oid)
    assert reply.configuration.model.temperature == 0.3
    assert provenance_tuple(reply.provenance["model.temperature"]) == config_source(common_pb2.LAYER_ORG, low)

    on = await ai_stub.SetAIConfigActive(ai.SetAIConfigActiveRequest(id=high.id, active=True), metadata=ADMIN)
    assert (on.config.active, on.config.version) == (True, 3)
    reply = await get_effective(ai_stub, uid, oid)
    assert reply.configuration.model.temperature == 0.6
    assert reply.provenance["model.temperature"].version == 3


async def test_equal_priorities_are_ordered_by_name_and_created_inactive_configs_are_skipped(ai_stub) -> None:
    uid, oid = unique("u"), unique("o")
    beta = await create_config(ai_stub, org_id=oid, name="beta", priority=5, values={"model.temperature": 0.2})
    alpha = await create_config(ai_stub, org_id=oid, name="alpha", priority=5, values={"model.temperature": 0.1})
    dormant = await create_config(
        ai_stub, org_id=oid, name="zeta", priority=99, active=False, values={"model.temperature": 0.9}
    )
    assert not dormant.active
    reply = await get_effective(ai_stub, uid, oid)
    # Ascending (priority, name): beta applies after alpha and wins; the inactive zeta counts not at all.
    assert reply.configuration.model.temperature == 0.2
    assert provenance_tuple(reply.provenance["model.temperature"]) == config_source(common_pb2.LAYER_ORG, beta)
    await ai_stub.DeleteAIConfig(ai.DeleteAIConfigRequest(id=beta.id), metadata=ADMIN)
    reply = await get_effective(ai_stub, uid, oid)
    assert provenance_tuple(reply.provenance["model.temperature"]) == config_source(common_pb2.LAYER_ORG, alpha)


async def test_user_configs_override_org_configs_by_priority_too(ai_stub) -> None:
    uid, oid = unique("u"), unique("o")
    await create_config(ai_stub, org_id=oid, priority=1000, values={"model.max_tokens": 100, "model.streaming": True})
    first = await create_config(ai_stub, user_id=uid, priority=2, values={"model.max_tokens": 200})
    await create_config(ai_stub, user_id=uid, priority=1, values={"model.max_tokens": 300})
    reply = await get_effective(ai_stub, uid, oid)
    assert reply.configuration.model.max_tokens == 200
    assert provenance_tuple(reply.provenance["model.max_tokens"]) == config_source(common_pb2.LAYER_USER, first)
    assert reply.configuration.model.streaming is True
    assert reply.provenance["model.streaming"].layer == common_pb2.LAYER_ORG


async def test_list_orders_by_priority_then_name_and_pages(ai_stub) -> None:
    oid = unique("o")
    for name, priority in [("c", 3), ("b", 1), ("e", 2), ("a", 1), ("d", 0)]:
        await create_config(ai_stub, org_id=oid, name=name, priority=priority)
    names: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await ai_stub.ListAIConfigs(
            ai.ListAIConfigsRequest(org_id=oid, page_size=2, page_token=token), metadata=ADMIN
        )
        pages += 1
        assert len(page.configs) <= 2
        names += [c.name for c in page.configs]
        token = page.next_page_token
        if not token:
            break
    assert names == ["d", "a", "b", "e", "c"] and pages == 3
    first = await ai_stub.ListAIConfigs(ai.ListAIConfigsRequest(org_id=oid, page_size=2), metadata=ADMIN)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.ListAIConfigs(
            ai.ListAIConfigsRequest(org_id=unique("o"), page_size=2, page_token=first.next_page_token),
            metadata=ADMIN,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in field_violations(err.value)


# --- create / update / delete semantics and change rows ----------------------------------------


async def test_versions_and_change_rows_of_every_write(ai_stub, db) -> None:
    uid = unique("u")
    created = await create_config(ai_stub, user_id=uid, name="mine", values={"model.temperature": 0.5})
    assert (created.version, created.created_by, created.updated_by, created.active) == (1, "ops", "ops", True)
    assert created.create_time.seconds > 0
    updated = await ai_stub.UpdateAIConfig(
        ai.UpdateAIConfigRequest(
            config=ai.AIConfig(id=created.id, priority=7),
            update_mask=field_mask_pb2.FieldMask(paths=["priority"]),
            reason="raise it",
        ),
        metadata=auth("admin", "ops2"),
    )
    assert (updated.config.version, updated.config.priority, updated.config.updated_by) == (2, 7, "ops2")
    assert updated.config.configuration.model.temperature == 0.5
    toggled = await ai_stub.SetAIConfigActive(ai.SetAIConfigActiveRequest(id=created.id, active=False), metadata=ADMIN)
    assert toggled.config.version == 3
    deleted = await ai_stub.DeleteAIConfig(ai.DeleteAIConfigRequest(id=created.id), metadata=ADMIN)
    assert deleted.version == 4
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.GetAIConfig(ai.GetAIConfigRequest(id=created.id), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    rows = await db.fetch(
        "SELECT kind, scope_kind, scope_id, key, version, old_value, new_value, actor, reason FROM changes "
        "WHERE key = $1 ORDER BY id",
        f"ai_config/{created.id}",
    )
    assert [(r["kind"], r["scope_kind"], r["scope_id"], r["version"]) for r in rows] == [
        ("ai_config", "USER", uid, v) for v in (1, 2, 3, 4)
    ]
    doc = {"name": "mine", "priority": 0, "active": True, "configuration": {"model.temperature": 0.5}}
    assert (rows[0]["old_value"], rows[0]["new_value"]) == (None, doc)
    assert rows[1]["old_value"] == doc and rows[1]["new_value"] == {**doc, "priority": 7}
    assert (rows[1]["actor"], rows[1]["reason"]) == ("ops2", "raise it")
    assert rows[2]["new_value"]["active"] is False
    assert rows[3]["old_value"]["active"] is False and rows[3]["new_value"] is None
    assert await db.fetchval("SELECT count(*) FROM ai_configs WHERE id = $1::uuid", created.id) == 0


async def test_update_mask_paths_patch_and_clear(ai_stub) -> None:
    uid = unique("u")
    config = await create_config(
        ai_stub,
        user_id=uid,
        values={"model.temperature": 0.5, "model.top_p": 0.4, "retry.max_retries": 7, "timeouts.total_ms": 5000},
    )

    async def update(values: dict[str, Any], paths: list[str], **fields: Any) -> ai.AIConfig:
        reply = await ai_stub.UpdateAIConfig(
            ai.UpdateAIConfigRequest(
                config=ai.AIConfig(id=config.id, configuration=configuration(values), **fields),
                update_mask=field_mask_pb2.FieldMask(paths=paths),
            ),
            metadata=ADMIN,
        )
        return reply.config

    # A named field path that is unset in the request clears it: the field inherits again.
    cleared = await update({}, ["configuration.model.temperature"])
    assert flat(cleared.configuration) == {"model.top_p": 0.4, "retry.max_retries": 7, "timeouts.total_ms": 5000}
    reply = await get_effective(ai_stub, uid)
    baseline = await get_effective(ai_stub, unique("u"))
    assert reply.configuration.model.temperature == baseline.configuration.model.temperature
    assert provenance_tuple(reply.provenance["model.temperature"]) == provenance_tuple(
        baseline.provenance["model.temperature"]
    )
    assert reply.provenance["model.temperature"].layer != common_pb2.LAYER_USER
    # A section path replaces the whole section.
    section = await update({"model.streaming": True}, ["configuration.model"])
    assert flat(section.configuration) == {"model.streaming": True, "retry.max_retries": 7, "timeouts.total_ms": 5000}
    # An empty mask applies every populated field and keeps the rest.
    patched = await update({"retry.max_retries": 2}, [], name="renamed")
    assert patched.name == "renamed"
    assert flat(patched.configuration) == {"model.streaming": True, "retry.max_retries": 2, "timeouts.total_ms": 5000}
    # "configuration" replaces everything.
    replaced = await update({"rate_limiting.burst_allowance": 0}, ["configuration"])
    assert flat(replaced.configuration) == {"rate_limiting.burst_allowance": 0}
    assert replaced.version == 5
    reply = await get_effective(ai_stub, uid)
    assert reply.configuration.rate_limiting.burst_allowance == 0
    assert reply.configuration.retry.max_retries == baseline.configuration.retry.max_retries
    assert reply.provenance["retry.max_retries"].layer != common_pb2.LAYER_USER


async def test_boundary_values_are_accepted(ai_stub) -> None:
    uid = unique("u")
    edge = {
        "model.temperature": 1.0,
        "model.top_p": 0.0,
        "model.max_tokens": 4096,
        "rate_limiting.requests_per_minute": 1,
        "rate_limiting.concurrent_requests": 1,
        "rate_limiting.burst_allowance": 0,
        "retry.max_retries": 10,
        "retry.base_delay_ms": 0,
        "retry.max_delay_ms": 0,
        "cost_budget.daily_usd": 0.0,
        "cost_budget.weekly_usd": 0.0,
        "cost_budget.monthly_usd": 0.0,
        "cost_budget.alert_thresholds": [1.0],
        "timeouts.generation_ms": 1,
        "timeouts.connection_ms": 1,
        "timeouts.total_ms": 1,
    }
    config = await create_config(ai_stub, user_id=uid, values=edge)
    assert flat(config.configuration) == edge
    other = await create_config(ai_stub, user_id=unique("u"), values={"model.temperature": 0.0, "model.max_tokens": 1})
    assert flat(other.configuration) == {"model.temperature": 0.0, "model.max_tokens": 1}
    reply = await get_effective(ai_stub, uid)
    assert {k: v for k, v in flat(reply.configuration).items() if k in edge} == edge
    assert list(reply.violations) == []


# --- validation and bad input: code, field violations, nothing written --------------------------

P = "config.configuration."
RANGE_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "temperature below 0": ({"model.temperature": -0.1}, P + "model.temperature"),
    "temperature above 1": ({"model.temperature": 1.01}, P + "model.temperature"),
    "temperature NaN": ({"model.temperature": math.nan}, P + "model.temperature"),
    "top_p below 0": ({"model.top_p": -0.5}, P + "model.top_p"),
    "top_p above 1": ({"model.top_p": 1.5}, P + "model.top_p"),
    "max_tokens 0": ({"model.max_tokens": 0}, P + "model.max_tokens"),
    "max_tokens negative": ({"model.max_tokens": -5}, P + "model.max_tokens"),
    "max_tokens over the output limit": ({"model.max_tokens": 4097}, P + "model.max_tokens"),
    "unknown model": ({"model.model": "gpt-unknown-1"}, P + "model.model"),
    "requests_per_minute 0": ({"rate_limiting.requests_per_minute": 0}, P + "rate_limiting.requests_per_minute"),
    "concurrent_requests 0": ({"rate_limiting.concurrent_requests": 0}, P + "rate_limiting.concurrent_requests"),
    "burst_allowance negative": ({"rate_limiting.burst_allowance": -1}, P + "rate_limiting.burst_allowance"),
    "max_retries negative": ({"retry.max_retries": -1}, P + "retry.max_retries"),
    "max_retries above 10": ({"retry.max_retries": 11}, P + "retry.max_retries"),
    "unknown backoff": ({"retry.backoff": 99}, P + "retry.backoff"),
    "base_delay_ms negative": ({"retry.base_delay_ms": -1}, P + "retry.base_delay_ms"),
    "max below base in one config": (
        {"retry.base_delay_ms": 5000, "retry.max_delay_ms": 4000},
        P + "retry.max_delay_ms",
    ),
    "daily budget negative": ({"cost_budget.daily_usd": -1.0}, P + "cost_budget.daily_usd"),
    "daily budget infinite": ({"cost_budget.daily_usd": math.inf}, P + "cost_budget.daily_usd"),
    "threshold 0": ({"cost_budget.alert_thresholds": [0.0]}, P + "cost_budget.alert_thresholds"),
    "threshold above 1": ({"cost_budget.alert_thresholds": [0.5, 1.5]}, P + "cost_budget.alert_thresholds"),
    "threshold negative": ({"cost_budget.alert_thresholds": [-0.1]}, P + "cost_budget.alert_thresholds"),
    "thresholds descending": ({"cost_budget.alert_thresholds": [0.9, 0.5]}, P + "cost_budget.alert_thresholds"),
    "thresholds repeated": ({"cost_budget.alert_thresholds": [0.5, 0.5]}, P + "cost_budget.alert_thresholds"),
    "generation timeout 0": ({"timeouts.generation_ms": 0}, P + "timeouts.generation_ms"),
    "connection timeout 0": ({"timeouts.connection_ms": 0}, P + "timeouts.connection_ms"),
    "total timeout negative": ({"timeouts.total_ms": -1}, P + "timeouts.total_ms"),
    "unknown rotation schedule": ({"api_keys.rotation_schedule": 42}, P + "api_keys.rotation_schedule"),
}


@pytest.mark.parametrize("case", list(RANGE_CASES))
async def test_out_of_range_values_are_refused_and_write_nothing(ai_stub, db, case) -> None:
    values, field = RANGE_CASES[case]
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_config(ai_stub, user_id=unique("u"), values=values)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(err.value)) == [field]
    assert await row_counts(db) == before


# Cross-field rules over the merged chain: the config sets one side (derived from what a fresh subject
# resolves to), the other side comes from below; (written field, the other field, written value).
MERGED_CASES: dict[str, tuple[str, str, Any]] = {
    "max_delay below the base": ("retry.max_delay_ms", "retry.base_delay_ms", lambda other: other - 1),
    "base_delay above the max": ("retry.base_delay_ms", "retry.max_delay_ms", lambda other: other + 1),
    "daily above the weekly": ("cost_budget.daily_usd", "cost_budget.weekly_usd", lambda other: other + 1),
    "weekly above the monthly": ("cost_budget.weekly_usd", "cost_budget.monthly_usd", lambda other: other + 1),
    "weekly below the daily": ("cost_budget.weekly_usd", "cost_budget.daily_usd", lambda other: other / 2),
    "monthly below the weekly": ("cost_budget.monthly_usd", "cost_budget.weekly_usd", lambda other: other / 2),
    "max_tokens over the model's limit": ("model.max_tokens", "model.model", None),
}


def describe_source(prov: ai.AIFieldProvenance) -> str:
    """How a violation's description names the layer a value came from."""
    if prov.layer == common_pb2.LAYER_DEFAULT:
        return "(set by the default)"
    if prov.layer == common_pb2.LAYER_ENV:
        return "(set by the server environment)"
    return prov.config_name


@pytest.mark.parametrize("case", list(MERGED_CASES))
async def test_cross_field_rules_name_the_layer_of_the_other_value(ai_stub, db, case) -> None:
    written, other, value_of = MERGED_CASES[case]
    baseline = await get_effective(ai_stub, unique("u"))
    if value_of is None:
        models = await ai_stub.ListModels(ai.ListModelsRequest(), metadata=ADMIN)
        limit = {m.model: m.output_limit for m in models.models}[baseline.configuration.model.model]
        value = limit + 1
    else:
        value = value_of(flat(baseline.configuration)[other])
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_config(ai_stub, user_id=unique("u"), values={written: value})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(err.value)
    assert list(violations) == [P + written]
    assert describe_source(baseline.provenance[other]) in violations[P + written]
    assert await row_counts(db) == before


async def test_a_users_own_write_is_checked_against_its_orgs_configs(ai_stub, db) -> None:
    uid, oid = unique("u"), unique("o")
    org_config = await create_config(
        ai_stub, org_id=oid, name="slow-retries", values={"retry.base_delay_ms": 20000, "retry.max_delay_ms": 30000}
    )
    as_user = auth("user", uid, oid)
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_config(ai_stub, as_user, user_id=uid, values={"retry.max_delay_ms": 10000})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(err.value)
    assert list(violations) == [P + "retry.max_delay_ms"]
    assert oid in violations[P + "retry.max_delay_ms"] and org_config.name in violations[P + "retry.max_delay_ms"]
    assert await row_counts(db) == before
    ok = await create_config(ai_stub, as_user, user_id=uid, values={"retry.max_delay_ms": 40000})
    assert ok.version == 1


async def test_only_new_violations_are_refused(ai_stub, db) -> None:
    """An ORG change may break a user's chain; the user's later unrelated writes still go through,
    and GetEffectiveAIConfig reports the break with the layer that caused it."""
    uid, oid = unique("u"), unique("o")
    as_user = auth("user", uid, oid)
    mine = await create_config(ai_stub, as_user, user_id=uid, values={"retry.max_delay_ms": 20000})
    await create_config(ai_stub, org_id=oid, values={"retry.base_delay_ms": 30000, "retry.max_delay_ms": 40000})
    reply = await get_effective(ai_stub, uid, oid)
    assert len(reply.violations) == 1
    violation = reply.violations[0]
    assert violation.field in ("configuration.retry.max_delay_ms", "configuration.retry.base_delay_ms")
    assert provenance_tuple(violation.source) == provenance_tuple(
        reply.provenance[violation.field.removeprefix("configuration.")]
    )
    assert violation.description
    # The user's chain is already broken; a write that adds no new violation is accepted.
    again = await ai_stub.UpdateAIConfig(
        ai.UpdateAIConfigRequest(
            config=ai.AIConfig(id=mine.id, configuration=configuration({"model.temperature": 0.1})),
            update_mask=field_mask_pb2.FieldMask(paths=["configuration.model.temperature"]),
        ),
        metadata=as_user,
    )
    assert again.config.version == 2
    # One that adds a new one is not.
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.UpdateAIConfig(
            ai.UpdateAIConfigRequest(
                config=ai.AIConfig(id=mine.id, configuration=configuration({"cost_budget.daily_usd": 900.0})),
                update_mask=field_mask_pb2.FieldMask(paths=["configuration.cost_budget.daily_usd"]),
            ),
            metadata=as_user,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert P + "cost_budget.daily_usd" in field_violations(err.value)
    assert await row_counts(db) == before


async def test_an_invalid_update_changes_nothing(ai_stub, db) -> None:
    uid = unique("u")
    config = await create_config(ai_stub, user_id=uid, values={"model.temperature": 0.5})
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.UpdateAIConfig(
            ai.UpdateAIConfigRequest(
                config=ai.AIConfig(
                    id=config.id, configuration=configuration({"model.temperature": 0.6, "model.top_p": 7.0})
                )
            ),
            metadata=ADMIN,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(err.value)) == [P + "model.top_p"]
    assert await row_counts(db) == before
    stored = await ai_stub.GetAIConfig(ai.GetAIConfigRequest(id=config.id), metadata=ADMIN)
    assert (stored.config.version, flat(stored.config.configuration)) == (1, {"model.temperature": 0.5})


def _owners(**owner: Any) -> ai.AIConfig:
    return config_message(**owner)


OWNER_CASES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "user and org": ({"user_id": "u-x", "org_id": "o-x"}, ("config.user_id", "config.org_id")),
    "org and global": ({"org_id": "o-x", "is_global": True}, ("config.org_id", "config.global")),
    "user and global": ({"user_id": "u-x", "is_global": True}, ("config.user_id", "config.global")),
    "no owner": ({}, ("config",)),
}


@pytest.mark.parametrize("case", list(OWNER_CASES))
async def test_a_config_at_other_than_exactly_one_scope_is_refused(ai_stub, db, case) -> None:
    owner, fields = OWNER_CASES[case]
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.CreateAIConfig(ai.CreateAIConfigRequest(config=_owners(**owner)), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(err.value)) & set(fields), field_violations(err.value)
    assert await row_counts(db) == before


@pytest.mark.parametrize("name", ["", "-leading-dash", "has space", "x" * 129, "slash/name", "ünïcode"])
async def test_malformed_names_are_refused(ai_stub, db, name) -> None:
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_config(ai_stub, user_id=unique("u"), name=name)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(err.value)) == ["config.name"]
    assert await row_counts(db) == before


async def test_longest_name_is_accepted(ai_stub) -> None:
    name = "N" + "a._-" * 31 + "xyz"
    assert len(name) == 128
    assert (await create_config(ai_stub, user_id=unique("u"), name=name)).name == name


async def test_duplicate_names_in_one_scope_are_already_exists(ai_stub, db) -> None:
    oid, uid = unique("o"), unique("u")
    first = await create_config(ai_stub, org_id=oid, name="shared-name")
    # The same name at another scope is fine.
    await create_config(ai_stub, user_id=uid, name="shared-name")
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create_config(ai_stub, org_id=oid, name="shared-name", values={"model.temperature": 0.1})
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(err.value) == "AI_CONFIG_EXISTS"
    assert "config.name" in bad_request(err.value)
    # Renaming another config onto a taken name is refused the same way.
    second = await create_config(ai_stub, org_id=oid, name="other-name")
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.UpdateAIConfig(
            ai.UpdateAIConfigRequest(
                config=ai.AIConfig(id=second.id, name=first.name),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            ),
            metadata=ADMIN,
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(err.value) == "AI_CONFIG_EXISTS"
    assert "config.name" in bad_request(err.value)
    assert await row_counts(db) == before


def _by_id_calls(config_id: str) -> dict[str, tuple[str, Any, str]]:
    """RPC name -> (method, request, the field naming the id)."""
    return {
        "get": ("GetAIConfig", ai.GetAIConfigRequest(id=config_id), "id"),
        "update": (
            "UpdateAIConfig",
            ai.UpdateAIConfigRequest(config=ai.AIConfig(id=config_id, priority=1)),
            "config.id",
        ),
        "delete": ("DeleteAIConfig", ai.DeleteAIConfigRequest(id=config_id), "id"),
        "set_active": ("SetAIConfigActive", ai.SetAIConfigActiveRequest(id=config_id, active=False), "id"),
        "rotate": ("RotateAPIKey", ai.RotateAPIKeyRequest(id=config_id, new_key=new_key()), "id"),
    }


@pytest.mark.parametrize("rpc", ["get", "update", "delete", "set_active", "rotate"])
async def test_unknown_and_malformed_ids(ai_stub, db, rpc) -> None:
    before = await row_counts(db)
    method, request, _field = _by_id_calls(str(uuid.uuid4()))[rpc]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(ai_stub, method)(request, metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(err.value) == "AI_CONFIG_NOT_FOUND"
    method, request, field = _by_id_calls("not-a-uuid")[rpc]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(ai_stub, method)(request, metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(err.value)) & {field, "id", "config.id"}
    assert await row_counts(db) == before


@pytest.mark.parametrize("rpc", ["update", "delete", "set_active", "rotate"])
async def test_expected_version_mismatch_is_a_version_conflict(ai_stub, db, rpc) -> None:
    config = await create_config(ai_stub, user_id=unique("u"), keys={"primary": new_key()})
    method, request, _field = _by_id_calls(config.id)[rpc]
    request.expected_version = 2
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(ai_stub, method)(request, metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "VERSION_CONFLICT"
    assert await row_counts(db) == before
    request.expected_version = 1
    await getattr(ai_stub, method)(request, metadata=ADMIN)
    assert await db.fetchval("SELECT max(version) FROM changes WHERE key = $1", f"ai_config/{config.id}") == 2


@pytest.mark.parametrize("path", ["configuration.model.nope", "colour", "configuration.nosection", "id"])
async def test_unknown_update_mask_paths_are_refused(ai_stub, db, path) -> None:
    config = await create_config(ai_stub, user_id=unique("u"))
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.UpdateAIConfig(
            ai.UpdateAIConfigRequest(
                config=ai.AIConfig(id=config.id, priority=3), update_mask=field_mask_pb2.FieldMask(paths=[path])
            ),
            metadata=ADMIN,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask.paths" in field_violations(err.value)
    assert await row_counts(db) == before


@pytest.mark.parametrize(
    "owner", [{"user_id": "someone-else"}, {"org_id": "some-org"}, {"global": True}], ids=["user", "org", "global"]
)
async def test_the_owner_of_a_config_cannot_change(ai_stub, db, owner) -> None:
    uid = unique("u")
    config = await create_config(ai_stub, user_id=uid)
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.UpdateAIConfig(
            ai.UpdateAIConfigRequest(config=ai.AIConfig(id=config.id, priority=4, **owner)), metadata=ADMIN
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await row_counts(db) == before
    # Repeating the stored owner is fine.
    same = await ai_stub.UpdateAIConfig(
        ai.UpdateAIConfigRequest(config=ai.AIConfig(id=config.id, user_id=uid, priority=4)), metadata=ADMIN
    )
    assert (same.config.user_id, same.config.priority, same.config.version) == (uid, 4, 2)


async def test_an_overlong_reason_is_refused(ai_stub, db) -> None:
    before = await row_counts(db)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.CreateAIConfig(
            ai.CreateAIConfigRequest(config=config_message(user_id=unique("u")), reason="r" * 1025), metadata=ADMIN
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reason" in field_violations(err.value)
    assert await row_counts(db) == before


@pytest.mark.parametrize(
    "request_kwargs",
    [{}, {"user_id": "u1", "org_id": "o1"}, {"org_id": "o1", "global": True}],
    ids=["none", "user-and-org", "org-and-global"],
)
async def test_list_needs_exactly_one_scope(ai_stub, request_kwargs) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.ListAIConfigs(ai.ListAIConfigsRequest(**request_kwargs), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err.value)


# --- permissions -------------------------------------------------------------------------------


async def test_a_user_manages_only_its_own_user_configs(ai_stub, db) -> None:
    alice, bob, oid = unique("alice"), unique("bob"), unique("o")
    as_alice = auth("user", alice, oid)
    mine = await create_config(ai_stub, as_alice, user_id=alice, values={"model.temperature": 0.3})
    assert (mine.created_by, mine.user_id) == (alice, alice)
    updated = await ai_stub.UpdateAIConfig(
        ai.UpdateAIConfigRequest(config=ai.AIConfig(id=mine.id, priority=2)), metadata=as_alice
    )
    assert updated.config.version == 2
    bobs = await create_config(ai_stub, user_id=bob, values={"model.temperature": 0.4})

    before = await row_counts(db)
    refused = [
        ("CreateAIConfig", ai.CreateAIConfigRequest(config=config_message(user_id=bob))),
        ("CreateAIConfig", ai.CreateAIConfigRequest(config=config_message(org_id=oid))),
        ("CreateAIConfig", ai.CreateAIConfigRequest(config=config_message(is_global=True))),
        ("UpdateAIConfig", ai.UpdateAIConfigRequest(config=ai.AIConfig(id=bobs.id, priority=9))),
        ("DeleteAIConfig", ai.DeleteAIConfigRequest(id=bobs.id)),
        ("SetAIConfigActive", ai.SetAIConfigActiveRequest(id=bobs.id, active=False)),
        ("RotateAPIKey", ai.RotateAPIKeyRequest(id=bobs.id, new_key=new_key())),
        ("GetAIConfig", ai.GetAIConfigRequest(id=bobs.id)),
        ("ListAIConfigs", ai.ListAIConfigsRequest(user_id=bob)),
        ("ListAIConfigs", ai.ListAIConfigsRequest(org_id=unique("o"))),
        ("GetEffectiveAIConfig", ai.GetEffectiveAIConfigRequest(subject=common_pb2.Subject(user_id=bob))),
        ("GetBudgetStatus", ai.GetBudgetStatusRequest(subject=common_pb2.Subject(user_id=bob))),
        (
            "RecordUsage",
            ai.RecordUsageRequest(
                subject=common_pb2.Subject(user_id=alice), model=HAIKU, input_tokens=1, request_id=unique("r")
            ),
        ),
        (
            "UpdateModel",
            ai.UpdateModelRequest(
                model=ai.AIModel(model=unique("m-"), context_window=10, output_limit=5, input_usd_per_1k=1)
            ),
        ),
    ]
    for method, request in refused:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await getattr(ai_stub, method)(request, metadata=as_alice)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
    assert await row_counts(db) == before
    stored = await ai_stub.GetAIConfig(ai.GetAIConfigRequest(id=bobs.id), metadata=ADMIN)
    assert (stored.config.version, stored.config.active) == (1, True)


async def test_a_user_reads_its_own_and_its_orgs_configs(ai_stub) -> None:
    uid, oid = unique("u"), unique("o")
    as_user = auth("user", uid, oid)
    org_config = await create_config(ai_stub, org_id=oid, values={"model.top_p": 0.2})
    mine = await create_config(ai_stub, user_id=uid)
    got = await ai_stub.GetAIConfig(ai.GetAIConfigRequest(id=org_config.id), metadata=as_user)
    assert got.config.configuration.model.top_p == 0.2
    listed = await ai_stub.ListAIConfigs(ai.ListAIConfigsRequest(org_id=oid), metadata=as_user)
    assert [c.id for c in listed.configs] == [org_config.id]
    listed = await ai_stub.ListAIConfigs(ai.ListAIConfigsRequest(user_id=uid), metadata=as_user)
    assert [c.id for c in listed.configs] == [mine.id]
    # Reading itself, the subject's org defaults to the token's.
    reply = await get_effective(ai_stub, uid, metadata=as_user)
    assert reply.configuration.model.top_p == 0.2
    assert provenance_tuple(reply.provenance["model.top_p"]) == config_source(common_pb2.LAYER_ORG, org_config)
    # Another org's config is not readable.
    foreign = await create_config(ai_stub, org_id=unique("o"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.GetAIConfig(ai.GetAIConfigRequest(id=foreign.id), metadata=as_user)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_org_and_global_writes_need_admin_and_services_write_no_configs(ai_stub, db) -> None:
    uid, oid = unique("u"), unique("o")
    service = auth("service", "generator")
    org_config = await create_config(ai_stub, org_id=oid, values={"model.streaming": True})
    before = await row_counts(db)
    for request in (
        ai.CreateAIConfigRequest(config=config_message(user_id=uid)),
        ai.CreateAIConfigRequest(config=config_message(org_id=oid)),
        ai.CreateAIConfigRequest(config=config_message(is_global=True)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ai_stub.CreateAIConfig(request, metadata=service)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for method, request in (
        ("UpdateAIConfig", ai.UpdateAIConfigRequest(config=ai.AIConfig(id=org_config.id, priority=3))),
        ("SetAIConfigActive", ai.SetAIConfigActiveRequest(id=org_config.id, active=False)),
        ("DeleteAIConfig", ai.DeleteAIConfigRequest(id=org_config.id)),
        ("RotateAPIKey", ai.RotateAPIKeyRequest(id=org_config.id, new_key=new_key())),
    ):
        for who in (service, auth("user", uid, oid)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await getattr(ai_stub, method)(request, metadata=who)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.UpdateModel(
            ai.UpdateModelRequest(model=ai.AIModel(model=unique("m-"), context_window=10, output_limit=5)),
            metadata=service,
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await row_counts(db) == before
    # A service reads anything.
    got = await ai_stub.GetAIConfig(ai.GetAIConfigRequest(id=org_config.id), metadata=service)
    assert got.config.configuration.model.streaming is True
    reply = await get_effective(ai_stub, uid, oid, metadata=service)
    assert reply.provenance["model.streaming"].config_id == org_config.id
    # The admin writes every scope.
    glob = await create_config(ai_stub, is_global=True, values={"timeouts.connection_ms": 10000})
    try:
        assert getattr(glob, "global") and glob.version == 1
    finally:
        await delete_quietly(ai_stub, glob.id)


async def test_calls_without_a_valid_token_are_unauthenticated(ai_stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.ListModels(ai.ListModelsRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ai_stub.GetEffectiveAIConfig(
            ai.GetEffectiveAIConfigRequest(subject=common_pb2.Subject(user_id="x")),
            metadata=(("authorization", "Bearer not-a-jwt"),),
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_concurrent_creates_of_one_name_yield_one_config(ai_stub, db) -> None:
    oid = unique("o")
    results = await asyncio.gather(
        *(create_config(ai_stub, org_id=oid, name="racy", values={"model.max_tokens": 100 + i}) for i in range(8)),
        return_exceptions=True,
    )
    created = [r for r in results if isinstance(r, ai.AIConfig)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) == 1 and len(refused) == 7
    assert {e.code() for e in refused} == {grpc.StatusCode.ALREADY_EXISTS}
    assert await db.fetchval("SELECT count(*) FROM ai_configs WHERE scope_id = $1", oid) == 1
    assert await db.fetchval("SELECT count(*) FROM changes WHERE scope_id = $1", oid) == 1
