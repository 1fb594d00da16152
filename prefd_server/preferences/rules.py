"""Pure rules of preferences: value and definition checks, cross-field rules, checks of request fields."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from prefd_server.kernel.errors import ValidationFailed, invalid
from prefd_server.kernel.ids import CATEGORY_PATTERN, id_problem, key_problem
from prefd_server.kernel.model import (
    MAX_JSON_BYTES,
    MAX_KEY_LENGTH,
    MAX_STRING_BYTES,
    FieldViolation,
    JsonValue,
    ScopeKind,
)
from prefd_server.kernel.value_checks import ValueChecks
from prefd_server.preferences.model import MAX_WRITES_PER_CALL, CrossFieldRule, Definition, ValueType
from prefd_server.preferences.policy import from_json as policy_from_json
from prefd_server.preferences.policy import is_policy
from prefd_server.preferences.policy import shape_problems as policy_shape_problems
from prefd_server.preferences.rollout import from_json as rollout_from_json
from prefd_server.preferences.rollout import is_rollout, shape_problems, variant_values

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is_int(value: JsonValue) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: JsonValue) -> bool:
    return (_is_int(value) or isinstance(value, float)) and not (isinstance(value, float) and not math.isfinite(value))


def value_problems(definition: Definition, value: JsonValue) -> list[str]:
    """Everything wrong with `value` as a value of `definition` (empty when it is valid). A rollout
    envelope is checked as a rollout whose every variant must be a valid value."""
    if is_policy(value):
        return _policy_problems(definition, value)
    if is_rollout(value):
        return _rollout_problems(definition, value)
    vt = definition.value_type
    if vt is ValueType.BOOL:
        return [] if isinstance(value, bool) else ["must be a bool"]
    if vt is ValueType.INT:
        if not _is_int(value):
            return ["must be an int"]
        if not INT64_MIN <= value <= INT64_MAX:
            return ["must fit in 64 bits"]
        return _range_problems(definition, value) + _allowed_problems(definition, value)
    if vt is ValueType.DOUBLE:
        if not _is_number(value):
            return ["must be a finite number"]
        return _range_problems(definition, value) + _allowed_problems(definition, value)
    if vt in (ValueType.STRING, ValueType.ENUM):
        if not isinstance(value, str):
            return ["must be a string"]
        return _string_problems(definition, value) + _allowed_problems(definition, value)
    if vt is ValueType.STRING_LIST:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            return ["must be a list of strings"]
        problems = []
        if definition.max_length is not None and len(value) > definition.max_length:
            problems.append(f"must have at most {definition.max_length} items (got {len(value)})")
        if len(json.dumps(value).encode()) > MAX_JSON_BYTES:
            problems.append(f"must be at most {MAX_JSON_BYTES} bytes as JSON")
        for item in value:
            if len(item.encode()) > MAX_STRING_BYTES:
                problems.append(f"items must be at most {MAX_STRING_BYTES} bytes")
                break
        if definition.allowed_values:
            bad = [item for item in value if item not in definition.allowed_values]
            if bad:
                problems.append(f"items {bad[:5]} are not among the allowed values")
        return problems
    if vt is ValueType.JSON:
        if not isinstance(value, dict):
            return ["must be a JSON object"]
        size = len(json.dumps(value, separators=(",", ":")).encode())
        return [f"must be at most {MAX_JSON_BYTES} bytes as JSON (got {size})"] if size > MAX_JSON_BYTES else []
    return ["has an unknown type"]


def checked_value_problems(definition: Definition, value: JsonValue, checks: ValueChecks | None) -> list[str]:
    """value_problems, then (for a value of the right type) what the checks registered for its key find
    (for a rollout: in each variant)."""
    problems = value_problems(definition, value)
    if problems or checks is None:
        return problems
    if is_policy(value):
        return checked_value_problems(definition, policy_from_json(value).value, checks)
    if is_rollout(value):
        variants = rollout_from_json(value).variants
        return [f"rollout variant {v.name} {p}" for v in variants for p in checks.problems(definition.key, v.value)]
    return checks.problems(definition.key, value)


def _policy_problems(definition: Definition, value: JsonValue) -> list[str]:
    try:
        policy = policy_from_json(value)
    except (KeyError, TypeError, ValueError, AttributeError):
        return ["is a malformed policy"]
    if is_policy(policy.value):
        return ["policy value must not be a policy"]
    problems = value_problems(definition, policy.value)
    for i, allowed in enumerate(policy.allowed):
        problems += [f"policy allowed_values[{i}] {p}" for p in value_problems(definition, allowed)]
    if not problems:
        problems = [f"policy {where}: {problem}" for where, problem in policy_shape_problems(definition, policy)]
    return problems


def _rollout_problems(definition: Definition, value: JsonValue) -> list[str]:
    try:
        rollout = rollout_from_json(value)
    except (KeyError, TypeError, ValueError, AttributeError):
        return ["is a malformed rollout"]
    problems = [f"rollout {where}: {problem}" for where, problem in shape_problems(rollout)]
    for i, variant in variant_values(rollout):
        if is_rollout(variant):
            problems.append(f"rollout variants[{i}].value must not be a rollout")
        else:
            problems += [f"rollout variants[{i}].value {p}" for p in value_problems(definition, variant)]
    return problems


def _range_problems(definition: Definition, value: float) -> list[str]:
    problems = []
    if definition.min_value is not None and value < definition.min_value:
        problems.append(f"must be >= {_fmt(definition.min_value)} (got {value})")
    if definition.max_value is not None and value > definition.max_value:
        problems.append(f"must be <= {_fmt(definition.max_value)} (got {value})")
    return problems


def _string_problems(definition: Definition, value: str) -> list[str]:
    problems = []
    if len(value.encode()) > MAX_STRING_BYTES:
        problems.append(f"must be at most {MAX_STRING_BYTES} bytes")
    if definition.max_length is not None and len(value) > definition.max_length:
        problems.append(f"must be at most {definition.max_length} characters (got {len(value)})")
    return problems


def _allowed_problems(definition: Definition, value: JsonValue) -> list[str]:
    if not definition.allowed_values or value in definition.allowed_values:
        return []
    allowed = ", ".join(json.dumps(v) for v in definition.allowed_values)
    return [f"must be one of {allowed} (got {json.dumps(value)})"]


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def coerce(definition: Definition, value: JsonValue) -> JsonValue:
    """Widen an int to float for DOUBLE definitions so stored values keep one type (in each variant of a
    rollout too)."""
    if is_policy(value):
        policy = policy_from_json(value)
        allowed = tuple(coerce(definition, v) for v in policy.allowed)
        return replace(policy, value=coerce(definition, policy.value), allowed=allowed).to_json()
    if is_rollout(value):
        rollout = rollout_from_json(value)
        variants = tuple(replace(v, value=coerce(definition, v.value)) for v in rollout.variants)
        return replace(rollout, variants=variants).to_json()
    if definition.value_type is ValueType.DOUBLE and _is_int(value):
        return float(value)
    return value


def definition_violations(definition: Definition, field: str = "definition") -> list[FieldViolation]:
    """Everything wrong with a definition as a whole."""
    out: list[FieldViolation] = []
    problem = key_problem(definition.key)
    if problem:
        out.append(FieldViolation(f"{field}.key", problem))
    if not CATEGORY_PATTERN.fullmatch(definition.category):
        out.append(
            FieldViolation(f"{field}.category", "must be 1-64 characters of [A-Za-z0-9_], starting with a letter")
        )
    if len(definition.description) > 1024:
        out.append(FieldViolation(f"{field}.description", "must be at most 1024 characters"))
    if not definition.scopes:
        out.append(FieldViolation(f"{field}.overridable_scopes", "must name at least one scope"))
    vt = definition.value_type
    numeric = vt in (ValueType.INT, ValueType.DOUBLE)
    if (definition.min_value is not None or definition.max_value is not None) and not numeric:
        out.append(FieldViolation(f"{field}.min_value", "min/max apply only to INT and DOUBLE"))
    if (
        definition.min_value is not None
        and definition.max_value is not None
        and definition.min_value > definition.max_value
    ):
        out.append(FieldViolation(f"{field}.max_value", "must be >= min_value"))
    if definition.max_length is not None:
        if vt not in (ValueType.STRING, ValueType.STRING_LIST):
            out.append(FieldViolation(f"{field}.max_length", "applies only to STRING and STRING_LIST"))
        elif definition.max_length < 1:
            out.append(FieldViolation(f"{field}.max_length", "must be >= 1"))
    if vt is ValueType.ENUM and not definition.allowed_values:
        out.append(FieldViolation(f"{field}.allowed_values", "ENUM needs at least one allowed value"))
    if definition.allowed_values and vt in (ValueType.BOOL, ValueType.JSON):
        out.append(FieldViolation(f"{field}.allowed_values", f"not supported for {vt.name}"))
    if vt is ValueType.STRING_LIST:
        item_definition = Definition(key="item", category="x", value_type=ValueType.STRING, default="")
        for i, allowed in enumerate(definition.allowed_values):
            for p in value_problems(item_definition, allowed):
                out.append(FieldViolation(f"{field}.allowed_values[{i}]", p))
    elif vt not in (ValueType.BOOL, ValueType.JSON):
        unconstrained = Definition(key="item", category="x", value_type=vt, default=None, allowed_values=())
        for i, allowed in enumerate(definition.allowed_values):
            for p in value_problems(unconstrained, allowed):
                out.append(FieldViolation(f"{field}.allowed_values[{i}]", p))
    if not out:
        for p in value_problems(definition, definition.default):
            out.append(FieldViolation(f"{field}.default_value", p))
    return out


def rule_violations(
    rules: Iterable[CrossFieldRule], effective: Mapping[str, JsonValue], touched: Iterable[str]
) -> list[tuple[CrossFieldRule, str]]:
    """Rules broken by the effective values, reported against the first touched key of each."""
    touched_set = set(touched)
    broken = []
    for rule in rules:
        keys = [k for k in rule.non_decreasing if k in effective]
        if not touched_set.intersection(keys):
            continue
        values = [effective[k] for k in keys]
        if any(not _is_number(v) for v in values):
            continue
        if any(a > b for a, b in itertools.pairwise(values)):
            blame = next(k for k in rule.non_decreasing if k in touched_set)
            broken.append((rule, blame))
    return broken


def check_key(key: str, field: str) -> str:
    """`key` if it is a valid definition key; ValidationFailed naming `field` otherwise."""
    problem = key_problem(key)
    if problem:
        raise invalid(field, problem)
    return key


def check_filters(key_prefixes: Sequence[str], categories: Sequence[str]) -> None:
    """ValidationFailed unless every key prefix and category filter of a read is of a usable length."""
    violations = [
        FieldViolation(f"key_prefixes[{i}]", f"must be at most {MAX_KEY_LENGTH} characters")
        for i, prefix in enumerate(key_prefixes)
        if len(prefix) > MAX_KEY_LENGTH
    ]
    violations += [
        FieldViolation(f"categories[{i}]", "must be 1-64 characters")
        for i, category in enumerate(categories)
        if not category or len(category) > 64
    ]
    if violations:
        raise ValidationFailed(violations)


def check_key_list(keys: Sequence[str], field: str) -> None:
    """ValidationFailed unless `keys` names 1..MAX_WRITES_PER_CALL valid keys, each once."""
    if not keys:
        raise invalid(field, "name at least one key")
    if len(keys) > MAX_WRITES_PER_CALL:
        raise invalid(field, f"at most {MAX_WRITES_PER_CALL} keys per call (got {len(keys)})")
    seen: set[str] = set()
    violations = []
    for i, key in enumerate(keys):
        problem = key_problem(key)
        if problem:
            violations.append(FieldViolation(f"{field}[{i}]", problem))
        elif key in seen:
            violations.append(FieldViolation(f"{field}[{i}]", f"{key} appears more than once"))
        seen.add(key)
    if violations:
        raise ValidationFailed(violations)


def write_org(requested: str, kind: ScopeKind, caller_org: str, is_admin: bool) -> str:
    """The org layer under a USER write: the request's (admin) or the caller's own; "" for other scopes."""
    if kind is not ScopeKind.USER:
        if requested:
            raise invalid("org_id", "applies only to USER scope writes")
        return ""
    if requested and not is_admin and requested != caller_org:
        raise invalid("org_id", "must be your own org")
    org = requested or caller_org
    if org and (problem := id_problem(org)):
        raise invalid("org_id", problem)
    return org
