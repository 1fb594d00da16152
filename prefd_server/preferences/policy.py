"""Policies (pure): an ORG or GLOBAL override that is enforced, or narrows the values the layers below may hold.

A policy is stored with the override's own value as the JSON object {"$policy": {"value": ..., ...}}, so
history, rollback, caches and the feed carry it like any value. Resolution skips a lower layer's
override that a policy above it shadows (enforced: every one; narrowed: one outside the narrowing) and
says so in provenance; a write below that breaks a policy is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prefd_server.kernel.model import JsonValue
from prefd_server.preferences.model import Definition, ValueType
from prefd_server.preferences.rollout import from_json as rollout_from_json
from prefd_server.preferences.rollout import is_rollout

ENVELOPE = "$policy"
MAX_ALLOWED_VALUES = 100
_NUMERIC = (ValueType.INT, ValueType.DOUBLE)


@dataclass(frozen=True, slots=True)
class Policy:
    """An override's value with what it imposes on the layers below."""

    value: JsonValue
    enforced: bool = False
    min_value: float | None = None
    max_value: float | None = None
    allowed: tuple[JsonValue, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The stored form: {"$policy": {...}}."""
        body: dict[str, Any] = {"value": self.value, "enforced": self.enforced}
        if self.min_value is not None:
            body["min"] = self.min_value
        if self.max_value is not None:
            body["max"] = self.max_value
        if self.allowed:
            body["allowed"] = list(self.allowed)
        return {ENVELOPE: body}


def is_policy(value: JsonValue) -> bool:
    """Whether a stored value is a policy envelope."""
    return isinstance(value, dict) and len(value) == 1 and ENVELOPE in value


def from_json(value: JsonValue) -> Policy:
    """The policy of a stored envelope."""
    body = value[ENVELOPE]
    return Policy(
        value=body["value"],
        enforced=bool(body.get("enforced", False)),
        min_value=body.get("min"),
        max_value=body.get("max"),
        allowed=tuple(body.get("allowed", ())),
    )


def own_value(value: JsonValue) -> JsonValue:
    """A stored value without its policy (the override's own value, a plain value or a rollout)."""
    return from_json(value).value if is_policy(value) else value


def _candidates(value: JsonValue) -> list[JsonValue]:
    """The values a lower override may give a subject: its value, or each variant of its rollout."""
    value = own_value(value)
    if is_rollout(value):
        return [variant.value for variant in rollout_from_json(value).variants]
    return [value]


def refusal(policy: Policy, value: JsonValue) -> str | None:
    """Why a lower layer's stored `value` may not apply under `policy` (None: it may)."""
    if policy.enforced:
        return "enforced"
    for candidate in _candidates(value):
        number = candidate if isinstance(candidate, int | float) and not isinstance(candidate, bool) else None
        if policy.min_value is not None and number is not None and number < policy.min_value:
            return f"min {_fmt(policy.min_value)}"
        if policy.max_value is not None and number is not None and number > policy.max_value:
            return f"max {_fmt(policy.max_value)}"
        if policy.allowed and not _among(candidate, policy.allowed):
            return "allowed " + ", ".join(json.dumps(v) for v in policy.allowed)
    return None


def _among(value: JsonValue, allowed: Sequence[JsonValue]) -> bool:
    if isinstance(value, list):  # a string list: every item must be allowed
        return all(item in allowed for item in value)
    return value in allowed


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def shape_problems(definition: Definition, policy: Policy) -> list[tuple[str, str]]:
    """(field, problem) for a policy that does not fit its definition: a narrowing only narrows (within
    the definition's own range and allowed values), and the override's own value keeps to it."""
    problems: list[tuple[str, str]] = []
    numeric = definition.value_type in _NUMERIC
    if (policy.min_value is not None or policy.max_value is not None) and not numeric:
        problems.append(("min_value", "min/max narrow only INT and DOUBLE keys"))
    if numeric:
        if (
            policy.min_value is not None
            and definition.min_value is not None
            and policy.min_value < definition.min_value
        ):
            problems.append(("min_value", f"must not be below the definition's min {_fmt(definition.min_value)}"))
        if (
            policy.max_value is not None
            and definition.max_value is not None
            and policy.max_value > definition.max_value
        ):
            problems.append(("max_value", f"must not be above the definition's max {_fmt(definition.max_value)}"))
        if policy.min_value is not None and policy.max_value is not None and policy.min_value > policy.max_value:
            problems.append(("min_value", "must not be above max_value"))
    if len(policy.allowed) > MAX_ALLOWED_VALUES:
        problems.append(("allowed_values", f"must have at most {MAX_ALLOWED_VALUES} values"))
    if policy.allowed and definition.value_type in (ValueType.BOOL, ValueType.JSON):
        problems.append(("allowed_values", f"cannot narrow a {definition.value_type.value} key"))
    elif definition.allowed_values:
        wider = [v for v in policy.allowed if v not in definition.allowed_values]
        if wider:
            problems.append(
                ("allowed_values", f"{json.dumps(wider[:5])} are not among the definition's allowed values")
            )
    if not problems and not policy.enforced and (why := refusal(policy, policy.value)) is not None:
        problems.append(("value", f"the override's own value breaks its narrowing ({why})"))
    return problems
