"""Conditions on event data: `{"<dotted.path>": {op: operand}}`, their validation and their evaluation (pure)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeGuard

MAX_CONDITION_PATHS = 64
MAX_PATH_SEGMENTS = 8
MAX_IN_ITEMS = 256
MAX_OPERAND_CHARS = 1024
OPERATORS = ("min", "max", "equals", "not_equals", "in", "contains", "exists")
SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_ABSENT = object()


def path_problem(path: object) -> str | None:
    """Why `path` is not a dotted path of 1-8 segments [A-Za-z_][A-Za-z0-9_]*, or None."""
    if not isinstance(path, str) or not path:
        return "must be a non-empty dotted path"
    segments = path.split(".")
    if len(segments) > MAX_PATH_SEGMENTS:
        return f"must have at most {MAX_PATH_SEGMENTS} segments"
    if not all(SEGMENT.fullmatch(segment) for segment in segments):
        return "must be segments [A-Za-z_][A-Za-z0-9_]* joined by dots"
    return None


def _is_number(value: object) -> TypeGuard[int | float]:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, bool | str) or _is_number(value)


def _scalar_problem(value: object) -> str | None:
    if not _is_scalar(value):
        return "must be a string, a finite number, a bool or null"
    if isinstance(value, str) and len(value) > MAX_OPERAND_CHARS:
        return f"must be at most {MAX_OPERAND_CHARS} characters"
    return None


def _operand_problem(op: str, operand: object) -> str | None:
    if op in ("min", "max"):
        return None if _is_number(operand) else "must be a finite number"
    if op == "exists":
        return None if isinstance(operand, bool) else "must be a bool"
    if op == "in":
        if not isinstance(operand, list) or not operand:
            return "must be a non-empty list"
        if len(operand) > MAX_IN_ITEMS:
            return f"must have at most {MAX_IN_ITEMS} items"
        return next((f"items {p}" for item in operand if (p := _scalar_problem(item))), None)
    return _scalar_problem(operand)  # equals, not_equals, contains


def condition_problems(conditions: object) -> list[str]:
    """Everything wrong with a conditions object, each as "<path>[.<op>]: <problem>" (empty when valid)."""
    if not isinstance(conditions, Mapping):
        return ["must be an object of path -> {operator: operand}"]
    if len(conditions) > MAX_CONDITION_PATHS:
        return [f"must have at most {MAX_CONDITION_PATHS} paths (got {len(conditions)})"]
    problems: list[str] = []
    for path, ops in conditions.items():
        if problem := path_problem(path):
            problems.append(f"{str(path)[:80]!r}: {problem}")
            continue
        if not isinstance(ops, Mapping) or not ops:
            problems.append(f"{path}: must be a non-empty object of {{operator: operand}}")
            continue
        for op, operand in ops.items():
            if op not in OPERATORS:
                problems.append(f"{path}: unknown operator {str(op)[:40]!r} (known: {', '.join(OPERATORS)})")
            elif problem := _operand_problem(op, operand):
                problems.append(f"{path}.{op}: {problem}")
        low, high = ops.get("min"), ops.get("max")
        if _is_number(low) and _is_number(high) and low > high:
            problems.append(f"{path}: min {low} is above max {high}")
    return problems


def lookup(data: object, path: str) -> Any:
    """The value at a dotted path into nested objects, or the module's absent marker."""
    node = data
    for segment in path.split("."):
        if not isinstance(node, Mapping) or segment not in node:
            return _ABSENT
        node = node[segment]
    return node


def values_at(data: object, paths: Iterable[str]) -> list[list[Any]]:
    """The values at `paths` ([value] when present, [] when absent): data with equal values at a
    condition's paths meets it alike, with the same words."""
    found = []
    for path in paths:
        value = lookup(data, path)
        found.append([] if value is _ABSENT else [value])
    return found


def _same(a: object, b: object) -> bool:
    # A bool equals only a bool (True == 1 in Python); numbers compare by value (Struct numbers are doubles).
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return a == b
    return type(a) is type(b) and a == b


def _shown(value: object) -> str:
    text = json.dumps(value, default=str, separators=(",", ":"))
    return text if len(text) <= 60 else text[:57] + "..."


def _failure(op: str, operand: Any, value: Any) -> str | None:
    """Why `value` fails `op operand`, or None when it holds (`value` is present)."""
    if op in ("min", "max"):
        if not _is_number(value):
            return f"is {_shown(value)}, not a number"
        if op == "min" and value < operand:
            return f"= {_shown(value)} is below min {_shown(operand)}"
        if op == "max" and value > operand:
            return f"= {_shown(value)} is above max {_shown(operand)}"
        return None
    if op == "equals":
        return None if _same(value, operand) else f"= {_shown(value)}, not equal to {_shown(operand)}"
    if op == "not_equals":
        return f"equals {_shown(operand)}" if _same(value, operand) else None
    if op == "in":
        return None if any(_same(value, item) for item in operand) else f"= {_shown(value)} is not in {_shown(operand)}"
    # contains: substring of a string, or an item of a list
    if isinstance(value, str) and isinstance(operand, str):
        return None if operand in value else f"= {_shown(value)} does not contain {_shown(operand)}"
    if isinstance(value, list):
        return None if any(_same(item, operand) for item in value) else f"does not contain {_shown(operand)}"
    return f"is {_shown(value)}, neither a list nor a string containing {_shown(operand)}"


def conditions_met(conditions: object, data: object) -> tuple[bool, str]:
    """Whether every operator of every path holds on `data`, and in words the first that does not.

    A path that is absent fails every operator except `exists: false`. Malformed conditions count as not
    met (never raise), so a decision made on a bad stored value stays safe and says why.
    """
    try:
        if problems := condition_problems(conditions):
            return False, f"malformed condition ({problems[0]})"
        assert isinstance(conditions, Mapping)
        for path, ops in conditions.items():
            value = lookup(data, path)
            for op, operand in ops.items():
                if op == "exists":
                    if (value is not _ABSENT) != operand:
                        return False, f"{path} is {'absent' if operand else 'present'} (exists: {_shown(operand)})"
                    continue
                if value is _ABSENT:
                    return False, f"{path} is absent ({op} {_shown(operand)})"
                if (why := _failure(op, operand, value)) is not None:
                    return False, f"{path} {why}"
        return True, f"conditions met on {len(conditions)} path(s)" if conditions else "no conditions"
    except Exception as exc:  # a decision never crashes on event data; it is traced as not met
        return False, f"condition not evaluable ({type(exc).__name__})"
