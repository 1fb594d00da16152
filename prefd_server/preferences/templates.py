"""Preference templates (pure): a named bundle of values for one scope kind, and the checks a template passes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from prefd_server.kernel.model import FieldViolation, JsonValue, ScopeKind
from prefd_server.preferences.model import Definition
from prefd_server.preferences.policy import is_policy
from prefd_server.preferences.rollout import is_rollout
from prefd_server.preferences.rules import value_problems

MAX_TEMPLATE_KEYS = 500
MAX_DESCRIPTION_LENGTH = 1024
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
TEMPLATE_SCOPES = (ScopeKind.USER, ScopeKind.ORG)


@dataclass(frozen=True, slots=True)
class Template:
    """A named bundle of values (by key) applied to scopes of one kind."""

    name: str
    scope_kind: ScopeKind
    values: Mapping[str, JsonValue]
    description: str = ""
    version: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    updated_by: str = ""
    times_applied: int = 0
    last_applied_at: datetime | None = None


def name_problem(name: str) -> str | None:
    """Why `name` is not a template name (None: it is)."""
    return None if NAME.fullmatch(name) else "must be 1-64 of [A-Za-z0-9_.-], starting with a letter"


def template_violations(
    template: Template, keys_in_order: list[str], definitions: Mapping[str, Definition]
) -> list[FieldViolation]:
    """Everything wrong with a template against today's definitions (`keys_in_order`: the request's keys,
    for field paths; a key given twice is reported)."""
    out: list[FieldViolation] = []
    if problem := name_problem(template.name):
        out.append(FieldViolation("template.name", problem))
    if template.scope_kind not in TEMPLATE_SCOPES:
        out.append(FieldViolation("template.scope_kind", "must be SCOPE_KIND_USER or SCOPE_KIND_ORG"))
    if len(template.description) > MAX_DESCRIPTION_LENGTH:
        out.append(FieldViolation("template.description", f"must be at most {MAX_DESCRIPTION_LENGTH} characters"))
    if not keys_in_order:
        out.append(FieldViolation("template.values", "must hold at least one value"))
    if len(keys_in_order) > MAX_TEMPLATE_KEYS:
        out.append(FieldViolation("template.values", f"must hold at most {MAX_TEMPLATE_KEYS} keys"))
        return out
    seen: set[str] = set()
    for i, key in enumerate(keys_in_order):
        field = f"template.values[{i}]"
        definition = definitions.get(key)
        if key in seen:
            out.append(FieldViolation(f"{field}.key", f"{key} appears more than once"))
        elif definition is None:
            out.append(FieldViolation(f"{field}.key", f"unknown key {key!r}"))
        elif template.scope_kind not in definition.scopes:
            out.append(FieldViolation(f"{field}.key", f"{key} cannot be overridden at {template.scope_kind.value}"))
        else:
            value = template.values[key]
            if is_rollout(value) or is_policy(value):
                out.append(FieldViolation(f"{field}.value", "must be a plain value"))
            out += [FieldViolation(f"{field}.value", f"{key} {p}") for p in value_problems(definition, value)]
        seen.add(key)
    return out
