"""AI configuration as data: field paths, seed 001's defaults, the fallback chain and its rules.

A configuration layer is a flat mapping of field path ("model.temperature") to value; only the
fields a layer sets are present. API keys travel as one unit (primary, secondary, key_version)
so a subject never gets one layer's primary key with another layer's secondary.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from prefd_server.kernel.model import FieldViolation, Layer, Scope

MASK_PREFIX = "****"
MIN_KEY_LENGTH = 8
MAX_KEY_LENGTH = 512
MAX_CONFIG_NAME = 128
CONFIG_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
NANOS_PER_USD = 1_000_000_000

BACKOFF_TYPES = ("exponential", "linear", "fixed")
ROTATION_SCHEDULES = ("manual", "monthly", "quarterly")

# Field path -> Python type of its value (thresholds are a list of floats).
FIELD_TYPES: dict[str, type] = {
    "model.model": str,
    "model.temperature": float,
    "model.max_tokens": int,
    "model.top_p": float,
    "model.streaming": bool,
    "rate_limiting.requests_per_minute": int,
    "rate_limiting.concurrent_requests": int,
    "rate_limiting.burst_allowance": int,
    "retry.max_retries": int,
    "retry.backoff": str,
    "retry.base_delay_ms": int,
    "retry.max_delay_ms": int,
    "cost_budget.daily_usd": float,
    "cost_budget.weekly_usd": float,
    "cost_budget.monthly_usd": float,
    "cost_budget.alert_thresholds": list,
    "timeouts.generation_ms": int,
    "timeouts.connection_ms": int,
    "timeouts.total_ms": int,
    "api_keys.rotation_schedule": str,
}
SECTIONS = ("model", "rate_limiting", "retry", "cost_budget", "timeouts", "api_keys")
KEY_SLOTS = ("primary", "secondary")
# Paths of the API key unit, as they appear in provenance and masks.
KEY_PATHS = ("api_keys.primary", "api_keys.secondary", "api_keys.key_version")

# Seed 001's DEFAULT_AI_CONFIGURATION.
DEFAULTS: dict[str, Any] = {
    "model.model": "claude-sonnet-4-5-20250929",
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


@dataclass(frozen=True, slots=True)
class APIKeySet:
    """A config's API keys: plaintext when decrypted, else only their last 4 characters."""

    key_version: int
    primary_last4: str
    secondary_last4: str = ""
    primary: str | None = None
    secondary: str | None = None

    @property
    def has_secondary(self) -> bool:
        return bool(self.secondary_last4)


@dataclass(frozen=True, slots=True)
class KeyUpdate:
    """New plaintext keys for a config's slots ("" empties a slot; absent slots keep theirs)."""

    slots: Mapping[str, str]
    # True when the primary changes and key_version must grow.
    new_primary: bool
    # True when the stored primary becomes the secondary (the new primary is in slots).
    rotate: bool = False


def mask(last4: str) -> str:
    """What an unprivileged caller sees of a key."""
    return MASK_PREFIX + last4


@dataclass(frozen=True, slots=True)
class AIConfigRecord:
    """A stored named configuration."""

    id: str
    scope: Scope
    name: str
    priority: int
    active: bool
    values: dict[str, Any]
    keys: APIKeySet | None
    version: int
    created_at: datetime | None = None
    created_by: str = ""
    updated_at: datetime | None = None
    updated_by: str = ""

    def audit_document(self) -> dict[str, Any]:
        """What the change row records: everything, keys masked."""
        doc: dict[str, Any] = {
            "name": self.name,
            "priority": self.priority,
            "active": self.active,
            "configuration": dict(self.values),
        }
        if self.keys is not None:
            doc["configuration"]["api_keys.primary"] = mask(self.keys.primary_last4)
            if self.keys.has_secondary:
                doc["configuration"]["api_keys.secondary"] = mask(self.keys.secondary_last4)
            doc["configuration"]["api_keys.key_version"] = self.keys.key_version
        return doc


# What a write does to a stored config (None: there is none / delete it) and to its keys.
Mutation = Callable[[AIConfigRecord | None], tuple[AIConfigRecord | None, KeyUpdate | None]]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One catalog model; prices in nano-USD per 1,000 tokens."""

    model: str
    context_window: int
    output_limit: int
    input_nanos_per_1k: int
    output_nanos_per_1k: int
    features: tuple[str, ...] = ()
    version: int = 1
    updated_at: datetime | None = None

    def cost(self, input_tokens: int, output_tokens: int) -> tuple[int, int]:
        """(input, output) cost in nano-USD, each rounded half up."""
        return _per_1k(input_tokens, self.input_nanos_per_1k), _per_1k(output_tokens, self.output_nanos_per_1k)


def _per_1k(tokens: int, nanos_per_1k: int) -> int:
    return (tokens * nanos_per_1k + 500) // 1000


def usd_to_nanos(usd: float) -> int:
    """A USD amount as whole nano-dollars (the decimal the float prints as, rounded half up)."""
    return int((Decimal(repr(usd)) * NANOS_PER_USD).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def nanos_to_usd(nanos: int) -> float:
    return nanos / NANOS_PER_USD


@dataclass(frozen=True, slots=True)
class Source:
    """Where an effective field came from."""

    layer: Layer
    scope: Scope | None = None
    config_id: str = ""
    config_name: str = ""
    version: int = 0

    def describe(self) -> str:
        if self.layer is Layer.DEFAULT:
            return "the default"
        if self.layer is Layer.ENV:
            return "the server environment"
        return f"{self.scope} config {self.config_name!r} (version {self.version})"


DEFAULT_SOURCE = Source(Layer.DEFAULT)
ENV_SOURCE = Source(Layer.ENV)


@dataclass(frozen=True, slots=True)
class ChainLayer:
    """One layer of the chain: its values, its key set, and where they came from."""

    source: Source
    values: Mapping[str, Any]
    keys: APIKeySet | None = None


@dataclass(slots=True)
class EffectiveAIConfig:
    """The merged configuration with per-field sources and the rules it breaks."""

    values: dict[str, Any]
    sources: dict[str, Source]
    keys: APIKeySet | None = None
    key_source: Source | None = None
    violations: list[Violation] = field(default_factory=list)

    @property
    def budgets_nanos(self) -> dict[str, int]:
        return {
            period: usd_to_nanos(float(self.values[f"cost_budget.{period}_usd"]))
            for period in ("daily", "weekly", "monthly")
        }


@dataclass(frozen=True, slots=True)
class Violation:
    """A rule the merged configuration breaks, blamed on the layer whose value caused it."""

    path: str
    description: str
    source: Source
    rule: str = ""  # which rule, so a violation is recognised again after an unrelated write


def config_layers(records: Sequence[AIConfigRecord], layer: Layer) -> list[ChainLayer]:
    """The active configs of one scope as chain layers, by ascending priority then name."""
    ordered = sorted((r for r in records if r.active), key=lambda r: (r.priority, r.name))
    return [ChainLayer(Source(layer, r.scope, r.id, r.name, r.version), r.values, r.keys) for r in ordered]


def env_layer(model: str | None, temperature: float | None, max_tokens: int | None, api_key: str | None) -> ChainLayer:
    """The server environment's layer (PREFD_AI_MODEL, _TEMPERATURE, _MAX_TOKENS, _API_KEY)."""
    values: dict[str, Any] = {}
    if model is not None:
        values["model.model"] = model
    if temperature is not None:
        values["model.temperature"] = float(temperature)
    if max_tokens is not None:
        values["model.max_tokens"] = int(max_tokens)
    keys = APIKeySet(1, api_key[-4:], primary=api_key) if api_key else None
    return ChainLayer(ENV_SOURCE, values, keys)


DEFAULT_LAYER = ChainLayer(DEFAULT_SOURCE, DEFAULTS)


def merge(layers: Sequence[ChainLayer], catalog: Mapping[str, ModelInfo]) -> EffectiveAIConfig:
    """Each field from the last (most specific) layer that sets it; then check the rules."""
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    keys: APIKeySet | None = None
    key_source: Source | None = None
    for layer in layers:
        for path, value in layer.values.items():
            values[path] = value
            sources[path] = layer.source
        if layer.keys is not None:
            keys, key_source = layer.keys, layer.source
    effective = EffectiveAIConfig(values, sources, keys, key_source)
    effective.violations = merged_violations(effective, catalog)
    return effective


def _blame(effective: EffectiveAIConfig, *paths: str) -> tuple[str, Source]:
    """The path among `paths` whose value comes from the most specific layer."""
    return max(((p, effective.sources[p]) for p in paths), key=lambda ps: _specificity(ps[1]))


def _specificity(source: Source) -> tuple[int, int]:
    return int(source.layer), source.version


def merged_violations(effective: EffectiveAIConfig, catalog: Mapping[str, ModelInfo]) -> list[Violation]:
    """Seed 001's rules over the merged result; a rule over two fields names where each value came from."""
    v = effective.values
    found: list[Violation] = []

    def by(path: str) -> str:
        return f"(set by {effective.sources[path].describe()})"

    def broken(rule: str, paths: tuple[str, ...], description: str) -> None:
        path, source = _blame(effective, *paths)
        found.append(Violation(path, description, source, rule))

    for path in FIELD_TYPES:
        for problem in value_problems(path, v[path]):
            broken(f"range:{path}", (path,), f"{problem} {by(path)}")
    model = catalog.get(v["model.model"])
    if model is None:
        broken("catalog", ("model.model",), f"model {v['model.model']!r} {by('model.model')} is not in the catalog")
    elif isinstance(v["model.max_tokens"], int) and v["model.max_tokens"] > model.output_limit:
        broken(
            "output_limit",
            ("model.max_tokens", "model.model"),
            f"max_tokens {v['model.max_tokens']} {by('model.max_tokens')} exceeds the output limit"
            f" {model.output_limit} of model {model.model} {by('model.model')}",
        )
    pairs = (
        ("delays", "retry.max_delay_ms", "retry.base_delay_ms", "max_delay_ms", "base_delay_ms"),
        ("weekly_budget", "cost_budget.weekly_usd", "cost_budget.daily_usd", "weekly budget", "daily budget"),
        ("monthly_budget", "cost_budget.monthly_usd", "cost_budget.weekly_usd", "monthly budget", "weekly budget"),
    )
    for rule, larger, smaller, larger_name, smaller_name in pairs:
        if v[larger] < v[smaller]:
            broken(
                rule,
                (larger, smaller),
                f"{larger_name} {v[larger]} {by(larger)} is below {smaller_name} {v[smaller]} {by(smaller)}",
            )
    return found


def value_problems(path: str, value: Any) -> list[str]:
    """What is wrong with one field's value on its own (range, enum, shape)."""
    if path in ("model.temperature", "model.top_p"):
        return [] if 0.0 <= value <= 1.0 and math.isfinite(value) else [f"must be between 0 and 1 (got {value})"]
    if path == "model.max_tokens":
        return [] if value >= 1 else [f"must be at least 1 (got {value})"]
    if path == "model.model":
        return [] if MODEL_ID_PATTERN.fullmatch(value) else ["must be a catalog model id"]
    if path in ("rate_limiting.requests_per_minute", "rate_limiting.concurrent_requests"):
        return [] if value >= 1 else [f"must be at least 1 (got {value})"]
    if path == "rate_limiting.burst_allowance":
        return [] if value >= 0 else [f"must not be negative (got {value})"]
    if path == "retry.max_retries":
        return [] if 0 <= value <= 10 else [f"must be between 0 and 10 (got {value})"]
    if path == "retry.backoff":
        return [] if value in BACKOFF_TYPES else [f"must be one of {', '.join(BACKOFF_TYPES)}"]
    if path in ("retry.base_delay_ms", "retry.max_delay_ms"):
        return [] if value >= 0 else [f"must not be negative (got {value})"]
    if path.startswith("cost_budget.") and path.endswith("_usd"):
        return [] if math.isfinite(value) and value >= 0 else [f"must be a non-negative amount (got {value})"]
    if path == "cost_budget.alert_thresholds":
        return _threshold_problems(value)
    if path.startswith("timeouts."):
        return [] if value >= 1 else [f"must be at least 1 ms (got {value})"]
    if path == "api_keys.rotation_schedule":
        return [] if value in ROTATION_SCHEDULES else [f"must be one of {', '.join(ROTATION_SCHEDULES)}"]
    return []


def _threshold_problems(thresholds: Sequence[float]) -> list[str]:
    problems = [f"{t} is not in (0, 1]" for t in thresholds if not (0.0 < t <= 1.0)]
    if any(b <= a for a, b in itertools.pairwise(thresholds)):
        problems.append("must be strictly ascending")
    if len(thresholds) > 20:
        problems.append("at most 20 thresholds")
    return problems


def layer_violations(values: Mapping[str, Any], prefix: str) -> list[FieldViolation]:
    """Per-field problems of one config's own values (before merging), with request paths."""
    return [
        FieldViolation(f"{prefix}.{path}", problem)
        for path, value in values.items()
        for problem in value_problems(path, value)
    ]


def key_problems(key: str) -> list[str]:
    """What is wrong with an API key given in clear."""
    if key.startswith(MASK_PREFIX):
        return ["is a masked key; send the key itself (or leave it out to keep the stored one)"]
    if not (MIN_KEY_LENGTH <= len(key) <= MAX_KEY_LENGTH):
        return [f"must be {MIN_KEY_LENGTH}-{MAX_KEY_LENGTH} characters"]
    if any(c.isspace() for c in key):
        return ["must not contain whitespace"]
    return []


def name_problem(name: str) -> str:
    if not CONFIG_NAME_PATTERN.fullmatch(name):
        return "must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
    return ""
