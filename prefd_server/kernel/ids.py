"""Identifiers every domain accepts: preference keys, subject and org ids, scopes."""

from __future__ import annotations

import re

from prefd_server.kernel.model import MAX_KEY_LENGTH, FieldViolation, Scope, ScopeKind

KEY_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
CATEGORY_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
# Each segment nests one level in `nested` views of effective values.
MAX_KEY_SEGMENTS = 8


def key_problem(key: str) -> str | None:
    """Why `key` is not a valid definition key, or None."""
    if not key:
        return "must not be empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"must be at most {MAX_KEY_LENGTH} characters (got {len(key)})"
    if not KEY_PATTERN.fullmatch(key):
        return "must be a dot path of segments [A-Za-z][A-Za-z0-9_]*"
    if key.count(".") >= MAX_KEY_SEGMENTS:
        return f"must have at most {MAX_KEY_SEGMENTS} segments"
    return None


def id_problem(value: str) -> str | None:
    """Why `value` is not a valid user or org id, or None."""
    if not value:
        return "must not be empty"
    if not ID_PATTERN.fullmatch(value):
        return "must be 1-128 characters of [A-Za-z0-9._:@+-], starting with a letter or digit"
    return None


def scope_violations(scope: Scope | None, field: str = "scope") -> list[FieldViolation]:
    """Violations for a malformed scope (GLOBAL takes no id; ORG and USER need one)."""
    if scope is None:
        return [FieldViolation(f"{field}.kind", "must be GLOBAL, ORG or USER")]
    if scope.kind is ScopeKind.GLOBAL:
        return [FieldViolation(f"{field}.id", "must be empty for GLOBAL")] if scope.id else []
    problem = id_problem(scope.id)
    return [FieldViolation(f"{field}.id", problem)] if problem else []
