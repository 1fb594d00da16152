"""Between prefd.v1 AI messages and the flat field-path form the AI config rules work on."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC as _UTC
from datetime import date, datetime, time
from typing import Any

from prefd.v1 import ai_config_pb2, common_pb2
from prefd_server.aiconfig.model import (
    BACKOFF_TYPES,
    FIELD_TYPES,
    KEY_SLOTS,
    ROTATION_SCHEDULES,
    AIConfigRecord,
    APIKeySet,
    EffectiveAIConfig,
    ModelInfo,
    Source,
    Violation,
    key_problems,
    mask,
    nanos_to_usd,
    usd_to_nanos,
)
from prefd_server.aiconfig.rules import ConfigFields, check_model
from prefd_server.aiconfig.usage import Crossing, Generation, PeriodStatus, UsageRecord
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import FieldViolation
from prefd_server.rpc.convert import scope_to_pb, subject_from_pb, timestamp

_BACKOFF_PB = {name: getattr(ai_config_pb2, f"BACKOFF_TYPE_{name.upper()}") for name in BACKOFF_TYPES}
_BACKOFF_NAME = {v: k for k, v in _BACKOFF_PB.items()}
_ROTATION_PB = {name: getattr(ai_config_pb2, f"ROTATION_SCHEDULE_{name.upper()}") for name in ROTATION_SCHEDULES}
_ROTATION_NAME = {v: k for k, v in _ROTATION_PB.items()}
PERIOD_PB = {
    "daily": ai_config_pb2.BUDGET_PERIOD_DAILY,
    "weekly": ai_config_pb2.BUDGET_PERIOD_WEEKLY,
    "monthly": ai_config_pb2.BUDGET_PERIOD_MONTHLY,
}
_ENUM_FIELDS = {"retry.backoff": _BACKOFF_NAME, "api_keys.rotation_schedule": _ROTATION_NAME}
_ENUM_VALUES = {"retry.backoff": _BACKOFF_PB, "api_keys.rotation_schedule": _ROTATION_PB}


def configuration_from_pb(
    message: ai_config_pb2.AIConfiguration, field: str
) -> tuple[dict[str, Any], dict[str, str], list[FieldViolation]]:
    """(values by path, plaintext keys by slot, violations) of the fields a request sets."""
    values: dict[str, Any] = {}
    violations: list[FieldViolation] = []
    for path, kind in FIELD_TYPES.items():
        section_name, name = path.split(".")
        section = getattr(message, section_name)
        if not section.HasField(name):
            continue
        raw = getattr(section, name)
        if path in _ENUM_FIELDS:
            if raw not in _ENUM_FIELDS[path]:
                violations.append(FieldViolation(f"{field}.{path}", "must be set to a known value"))
                continue
            values[path] = _ENUM_FIELDS[path][raw]
        elif kind is list:
            values[path] = [float(v) for v in raw.values]
        else:
            values[path] = kind(raw)
    keys: dict[str, str] = {}
    for slot in KEY_SLOTS:
        if message.api_keys.HasField(slot):  # type: ignore[arg-type]  # slot is "primary" or "secondary"
            key = getattr(message.api_keys, slot)
            violations += [FieldViolation(f"{field}.api_keys.{slot}", p) for p in key_problems(key)]
            keys[slot] = key
    if message.api_keys.HasField("key_version"):
        violations.append(FieldViolation(f"{field}.api_keys.key_version", "is output only; RotateAPIKey changes it"))
    return values, keys, violations


def config_fields_from_pb(message: ai_config_pb2.AIConfig) -> ConfigFields:
    return ConfigFields(message.name, message.priority, message.active)


def owner_from_pb(message: ai_config_pb2.AIConfig) -> tuple[str, str, bool]:
    """(user_id, org_id, global) as a config message names its owner."""
    return message.user_id, message.org_id, message.__getattribute__("global")


def configuration_to_pb(
    values: Mapping[str, Any], keys: APIKeySet | None, plaintext: Mapping[str, str] | None
) -> ai_config_pb2.AIConfiguration:
    """A configuration message; keys in clear only when `plaintext` is given."""
    message = ai_config_pb2.AIConfiguration()
    for path, value in values.items():
        section_name, name = path.split(".")
        section = getattr(message, section_name)
        if path in _ENUM_VALUES:
            setattr(section, name, _ENUM_VALUES[path][value])
        elif path == "cost_budget.alert_thresholds":
            section.alert_thresholds.values.extend(value)
        else:
            setattr(section, name, value)
    if keys is not None:
        message.api_keys.key_version = keys.key_version
        if plaintext is not None:
            message.api_keys.primary = plaintext.get("primary", "")
            if plaintext.get("secondary"):
                message.api_keys.secondary = plaintext["secondary"]
        else:
            message.api_keys.primary = mask(keys.primary_last4)
            if keys.has_secondary:
                message.api_keys.secondary = mask(keys.secondary_last4)
    return message


def source_to_pb(source: Source) -> ai_config_pb2.AIFieldProvenance:
    return ai_config_pb2.AIFieldProvenance(
        layer=int(source.layer),  # type: ignore[arg-type]
        scope=scope_to_pb(source.scope) if source.scope else None,
        config_id=source.config_id,
        config_name=source.config_name,
        version=source.version,
    )


def provenance_to_pb(effective: EffectiveAIConfig) -> dict[str, ai_config_pb2.AIFieldProvenance]:
    sources = {path: source_to_pb(source) for path, source in effective.sources.items()}
    if effective.keys is not None and effective.key_source is not None:
        key_source = source_to_pb(effective.key_source)
        sources["api_keys.primary"] = key_source
        sources["api_keys.key_version"] = key_source
        if effective.keys.has_secondary:
            sources["api_keys.secondary"] = key_source
    return sources


def violation_to_pb(violation: Violation) -> ai_config_pb2.AIConfigViolation:
    return ai_config_pb2.AIConfigViolation(
        field=f"configuration.{violation.path}",
        description=violation.description,
        source=source_to_pb(violation.source),
    )


def fill_effective(message: Any, effective: EffectiveAIConfig, plaintext: Mapping[str, str] | None) -> None:
    """Set the configuration, provenance and violations of a response that carries an effective config."""
    message.configuration.CopyFrom(configuration_to_pb(effective.values, effective.keys, plaintext))
    for path, source in provenance_to_pb(effective).items():
        message.provenance[path].CopyFrom(source)
    message.violations.extend(violation_to_pb(v) for v in effective.violations)


def config_to_pb(record: AIConfigRecord, plaintext: Mapping[str, str] | None) -> ai_config_pb2.AIConfig:
    return ai_config_pb2.AIConfig(
        id=record.id,
        name=record.name,
        user_id=record.scope.id if record.scope.kind.value == "USER" else "",
        org_id=record.scope.id if record.scope.kind.value == "ORG" else "",
        **{"global": record.scope.kind.value == "GLOBAL"},
        priority=record.priority,
        active=record.active,
        configuration=configuration_to_pb(record.values, record.keys, plaintext),
        version=record.version,
        create_time=timestamp(record.created_at),
        update_time=timestamp(record.updated_at),
        created_by=record.created_by,
        updated_by=record.updated_by,
    )


def model_to_pb(model: ModelInfo) -> ai_config_pb2.AIModel:
    return ai_config_pb2.AIModel(
        model=model.model,
        context_window=model.context_window,
        output_limit=model.output_limit,
        input_usd_per_1k=nanos_to_usd(model.input_nanos_per_1k),
        output_usd_per_1k=nanos_to_usd(model.output_nanos_per_1k),
        features=list(model.features),
        version=model.version,
        update_time=timestamp(model.updated_at),
    )


def model_from_pb(message: ai_config_pb2.AIModel) -> ModelInfo:
    """A validated catalog model."""
    prices = {"input_usd_per_1k": message.input_usd_per_1k, "output_usd_per_1k": message.output_usd_per_1k}
    check_model(message.model, message.context_window, message.output_limit, prices, message.features)
    return ModelInfo(
        model=message.model,
        context_window=message.context_window,
        output_limit=message.output_limit,
        input_nanos_per_1k=usd_to_nanos(message.input_usd_per_1k),
        output_nanos_per_1k=usd_to_nanos(message.output_usd_per_1k),
        features=tuple(message.features),
    )


def estimate_to_pb(input_cost: int, output_cost: int) -> ai_config_pb2.EstimateCostResponse:
    total = input_cost + output_cost
    return ai_config_pb2.EstimateCostResponse(
        cost_usd=nanos_to_usd(total), cost_nanos=total, input_cost_nanos=input_cost, output_cost_nanos=output_cost
    )


def generation_from_pb(request: ai_config_pb2.RecordUsageRequest) -> Generation:
    return Generation(
        subject_from_pb(request.subject, "subject"),
        request.model,
        request.input_tokens,
        request.output_tokens,
        request.request_id,
    )


def usage_to_pb(record: UsageRecord) -> ai_config_pb2.RecordUsageResponse:
    return ai_config_pb2.RecordUsageResponse(
        cost_nanos=record.cost_nanos,
        cost_usd=nanos_to_usd(record.cost_nanos),
        recorded=record.recorded,
        record_time=timestamp(record.recorded_at),
        crossed=[crossing_to_pb(c) for c in record.crossings],
    )


def budget_status_to_pb(periods: list[PeriodStatus]) -> ai_config_pb2.GetBudgetStatusResponse:
    return ai_config_pb2.GetBudgetStatusResponse(
        periods=[
            ai_config_pb2.BudgetPeriodStatus(
                period=PERIOD_PB[p.period],
                period_start=timestamp(day_start(p.start)),
                spent_usd=nanos_to_usd(p.spent_nanos),
                spent_nanos=p.spent_nanos,
                budget_usd=nanos_to_usd(p.budget_nanos),
                thresholds_crossed=p.thresholds_crossed,
                exceeded=p.exceeded,
            )
            for p in periods
        ]
    )


def day_start(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=_UTC)


def crossing_to_pb(crossing: Crossing) -> ai_config_pb2.BudgetThresholdCrossed:
    return ai_config_pb2.BudgetThresholdCrossed(
        period=PERIOD_PB[crossing.period],
        threshold=crossing.threshold,
        period_start=timestamp(day_start(crossing.period_start)),
        spent_usd=nanos_to_usd(crossing.spent_nanos),
        budget_usd=nanos_to_usd(crossing.budget_nanos),
        user_id=crossing.user_id,
        request_id=crossing.request_id,
    )


def crossing_from_document(user_id: str, doc: Mapping[str, Any]) -> Crossing:
    """A crossing as its change row recorded it."""
    return Crossing(
        period=doc["period"],
        threshold=float(doc["threshold"]),
        period_start=date.fromisoformat(doc["period_start"]),
        spent_nanos=int(doc["spent_nanos"]),
        budget_nanos=int(doc["budget_nanos"]),
        user_id=user_id,
        request_id=str(doc["request_id"]),
    )


def budget_event_to_pb(event: ChangeEvent, cursor: common_pb2.Cursor) -> ai_config_pb2.WatchAIConfigResponse:
    """A watched budget change row as the threshold crossing it records."""
    crossing = crossing_from_document(event.scope.id, event.new_value or {})
    return ai_config_pb2.WatchAIConfigResponse(
        budget=ai_config_pb2.BudgetEvent(crossed=crossing_to_pb(crossing), cursor=cursor)
    )


def config_changed_to_pb(event: ChangeEvent, cursor: common_pb2.Cursor) -> ai_config_pb2.AIConfigChanged:
    """A watched config change row (the effective configuration is filled in by the caller)."""
    doc = event.new_value or event.old_value or {}
    return ai_config_pb2.AIConfigChanged(
        config_id=event.key.removeprefix("ai_config/"),
        config_name=str(doc.get("name", "")),
        scope=scope_to_pb(event.scope),
        version=event.version,
        cursor=cursor,
    )
