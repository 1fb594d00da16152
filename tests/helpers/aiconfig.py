"""AIConfigService helpers: flat <-> protobuf configurations, configs by owner, provenance, row counts, usage."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from prefd.v1 import ai_config_pb2 as ai
from prefd.v1 import ai_config_pb2_grpc, common_pb2
from tests.helpers.auth import auth, unique

ADMIN = auth("admin")

HAIKU = "claude-3-haiku-20240307"
OPUS = "claude-3-opus-20240229"
SONNET = "claude-sonnet-4-5-20250929"
SEEDED_MODELS = (HAIKU, OPUS, SONNET)

# Seed 001's DEFAULT_AI_CONFIGURATION, by field path (the spec's list, not the server's module).
DEFAULTS: dict[str, Any] = {
    "model.model": SONNET,
    "model.temperature": 0.7,
    "model.max_tokens": 4096,
    "model.top_p": 0.9,
    "model.streaming": False,
    "rate_limiting.requests_per_minute": 50,
    "rate_limiting.concurrent_requests": 3,
    "rate_limiting.burst_allowance": 10,
    "retry.max_retries": 3,
    "retry.backoff": "exponential",
    "retry.base_delay_ms": 1000,
    "retry.max_delay_ms": 16000,
    "cost_budget.daily_usd": 100.0,
    "cost_budget.weekly_usd": 500.0,
    "cost_budget.monthly_usd": 2000.0,
    "cost_budget.alert_thresholds": [0.5, 0.75, 0.9],
    "timeouts.generation_ms": 60000,
    "timeouts.connection_ms": 10000,
    "timeouts.total_ms": 120000,
    "api_keys.rotation_schedule": "manual",
}
FIELDS = tuple(DEFAULTS)
BACKOFFS = {
    "exponential": ai.BACKOFF_TYPE_EXPONENTIAL,
    "linear": ai.BACKOFF_TYPE_LINEAR,
    "fixed": ai.BACKOFF_TYPE_FIXED,
}
ROTATIONS = {
    "manual": ai.ROTATION_SCHEDULE_MANUAL,
    "monthly": ai.ROTATION_SCHEDULE_MONTHLY,
    "quarterly": ai.ROTATION_SCHEDULE_QUARTERLY,
}
COUNTED_TABLES = ("ai_configs", "ai_api_keys", "ai_models", "ai_usage", "ai_usage_totals", "changes")


def configuration(values: dict[str, Any]) -> ai.AIConfiguration:
    """An AIConfiguration from a flat {"section.field": value} mapping (enums by lower-case name)."""
    conf = ai.AIConfiguration()
    for path, value in values.items():
        section, name = path.split(".")
        message = getattr(conf, section)
        if path == "cost_budget.alert_thresholds":
            message.alert_thresholds.values.extend(value)
        elif path == "retry.backoff":
            message.backoff = BACKOFFS[value] if isinstance(value, str) else value
        elif path == "api_keys.rotation_schedule":
            message.rotation_schedule = ROTATIONS[value] if isinstance(value, str) else value
        else:
            setattr(message, name, value)
    return conf


def flat(conf: ai.AIConfiguration) -> dict[str, Any]:
    """The set fields of a configuration (API keys excepted) as {"section.field": value}."""
    backoffs = {v: k for k, v in BACKOFFS.items()}
    rotations = {v: k for k, v in ROTATIONS.items()}
    out: dict[str, Any] = {}
    for path in FIELDS:
        section, name = path.split(".")
        message = getattr(conf, section)
        if path == "cost_budget.alert_thresholds":
            if message.HasField("alert_thresholds"):
                out[path] = list(message.alert_thresholds.values)
        elif message.HasField(name):
            value = getattr(message, name)
            if path == "retry.backoff":
                value = backoffs.get(value, value)
            elif path == "api_keys.rotation_schedule":
                value = rotations.get(value, value)
            out[path] = value
    return out


def masked(key: str) -> str:
    return "****" + key[-4:]


def new_key(prefix: str = "sk-ant-") -> str:
    """A plaintext API key no other test uses."""
    return prefix + uuid.uuid4().hex + uuid.uuid4().hex[:8]


def config_message(
    *,
    user_id: str = "",
    org_id: str = "",
    is_global: bool = False,
    name: str | None = None,
    priority: int = 0,
    active: bool = True,
    values: dict[str, Any] | None = None,
    keys: dict[str, str] | None = None,
) -> ai.AIConfig:
    config = ai.AIConfig(
        name=name if name is not None else unique("cfg"),
        user_id=user_id,
        org_id=org_id,
        priority=priority,
        active=active,
        configuration=configuration(values or {}),
        **{"global": is_global},
    )
    for slot, key in (keys or {}).items():
        setattr(config.configuration.api_keys, slot, key)
    return config


async def create_config(
    ai_stub: ai_config_pb2_grpc.AIConfigServiceStub,
    metadata: Any = ADMIN,
    **kwargs: Any,
) -> ai.AIConfig:
    """Create a config (kwargs as config_message) and return it as stored."""
    reply = await ai_stub.CreateAIConfig(ai.CreateAIConfigRequest(config=config_message(**kwargs)), metadata=metadata)
    return reply.config


async def get_effective(
    ai_stub: ai_config_pb2_grpc.AIConfigServiceStub, user_id: str, org_id: str = "", metadata: Any = ADMIN
) -> ai.GetEffectiveAIConfigResponse:
    return await ai_stub.GetEffectiveAIConfig(
        ai.GetEffectiveAIConfigRequest(subject=common_pb2.Subject(user_id=user_id, org_id=org_id)), metadata=metadata
    )


async def delete_quietly(ai_stub: ai_config_pb2_grpc.AIConfigServiceStub, config_id: str) -> None:
    """Delete a config in a finally block (NOT_FOUND: already gone)."""
    try:
        await ai_stub.DeleteAIConfig(ai.DeleteAIConfigRequest(id=config_id), metadata=ADMIN)
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise


async def row_counts(db: asyncpg.Connection) -> dict[str, int]:
    """Row counts of every table an AI write may touch, to show that a refused call wrote nothing."""
    return {table: await db.fetchval(f"SELECT count(*) FROM {table}") for table in COUNTED_TABLES}


def bad_request(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """field -> description from a BadRequest detail, whatever the status code."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no rich status on {error.code()}: {error.details()}"
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found


def provenance_tuple(prov: ai.AIFieldProvenance) -> tuple[Any, ...]:
    scope = (prov.scope.kind, prov.scope.id) if prov.HasField("scope") else None
    return (prov.layer, prov.config_id, prov.config_name, prov.version, scope)


def config_source(layer: int, config: ai.AIConfig) -> tuple[Any, ...]:
    """The provenance tuple a field set by `config` must carry."""
    if getattr(config, "global"):
        scope = (common_pb2.SCOPE_KIND_GLOBAL, "")
    elif config.org_id:
        scope = (common_pb2.SCOPE_KIND_ORG, config.org_id)
    else:
        scope = (common_pb2.SCOPE_KIND_USER, config.user_id)
    return (layer, config.id, config.name, config.version, scope)


DEFAULT_SOURCE = (common_pb2.LAYER_DEFAULT, "", "", 0, None)
ENV_SOURCE = (common_pb2.LAYER_ENV, "", "", 0, None)


SMALL_BUDGET: dict[str, Any] = {
    "cost_budget.daily_usd": 0.01,
    "cost_budget.weekly_usd": 1.0,
    "cost_budget.monthly_usd": 10.0,
    "cost_budget.alert_thresholds": [0.5, 0.9],
}


def usage(
    user_id: str,
    request_id: str,
    model: str = HAIKU,
    input_tokens: int = 1000,
    output_tokens: int = 1000,
    org_id: str = "",
) -> ai.RecordUsageRequest:
    return ai.RecordUsageRequest(
        subject=common_pb2.Subject(user_id=user_id, org_id=org_id),
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        request_id=request_id,
    )
