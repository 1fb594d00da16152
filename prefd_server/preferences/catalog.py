"""The definitions and cross-field rules prefd ships, read from a JSON data file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from prefd_server.kernel.model import ScopeKind
from prefd_server.preferences.model import CrossFieldRule, Definition, ValueType
from prefd_server.preferences.rules import definition_violations


class _DefinitionEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    category: str
    type: ValueType
    default: Any
    description: str = ""
    allowed_values: list[Any] = Field(default_factory=list)
    min: float | None = None
    max: float | None = None
    max_length: int | None = None
    scopes: list[ScopeKind] = Field(default_factory=lambda: list(ScopeKind))
    sensitive: bool = False


class _RuleEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    non_decreasing: list[str] = Field(min_length=2)
    message: str


class _CatalogFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    definitions: list[_DefinitionEntry]
    rules: list[_RuleEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class Catalog:
    """Shipped definitions and the cross-field rules that hold between keys."""

    definitions: tuple[Definition, ...]
    rules: tuple[CrossFieldRule, ...]


def load_catalog(path: Path | None = None) -> Catalog:
    """Parse and check the data file (the bundled one unless `path` is given); ValueError if invalid."""
    text = (
        path.read_text()
        if path
        else resources.files("prefd_server.preferences.data").joinpath("definitions.json").read_text()
    )
    parsed = _CatalogFile.model_validate(json.loads(text))
    definitions = tuple(
        Definition(
            key=e.key,
            category=e.category,
            value_type=e.type,
            default=float(e.default) if e.type is ValueType.DOUBLE else e.default,
            description=e.description,
            allowed_values=tuple(e.allowed_values),
            min_value=e.min,
            max_value=e.max,
            max_length=e.max_length,
            scopes=frozenset(e.scopes),
            sensitive=e.sensitive,
        )
        for e in parsed.definitions
    )
    problems = [f"{d.key}: {v.field} {v.description}" for d in definitions for v in definition_violations(d)]
    keys = {d.key for d in definitions}
    if len(keys) != len(definitions):
        problems.append("duplicate keys")
    problems += [f"{k} is a prefix of another key" for k in keys if any(o.startswith(k + ".") for o in keys)]
    rules = tuple(CrossFieldRule(r.id, tuple(r.non_decreasing), r.message) for r in parsed.rules)
    problems += [f"rule {r.id} names unknown key {k}" for r in rules for k in r.non_decreasing if k not in keys]
    if problems:
        raise ValueError("invalid definitions file: " + "; ".join(problems))
    return Catalog(definitions, rules)
