"""Rollouts (pure): weighted variants of one key, each subject assigned one by a consistent hash.

A rollout is stored where a value is (a definition's default, or an ORG or GLOBAL override) as the
JSON object {"$rollout": {...}}, so history, rollback, caches and the feed carry it like any value;
resolution replaces it with the subject's variant. The only algorithm so far is flagd's `fractional`
v2, so a prefd rollout and a flagd flag over the same salt and ids agree: MurmurHash3 x86_32 (seed 0)
over the UTF-8 of salt + bucketing id; bucket = (uint32 hash * total weight) >> 32; the first variant
whose cumulative weight exceeds the bucket wins.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mmh3

from prefd_server.kernel.model import JsonValue, RolloutAssignment

ENVELOPE = "$rollout"
MAX_VARIANTS = 32
MAX_SALT_LENGTH = 128
MAX_WEIGHT = 1_000_000
VARIANT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


class Algorithm(enum.StrEnum):
    """How subjects are bucketed (an explicit field, so another recipe can be added)."""

    FLAGD_FRACTIONAL_V2 = "flagd_fractional_v2"


class BucketBy(enum.StrEnum):
    """Which id of the subject is hashed."""

    USER_ID = "user_id"
    ORG_ID = "org_id"


@dataclass(frozen=True, slots=True)
class Variant:
    """One weighted value of a rollout."""

    name: str
    value: JsonValue
    weight: int


@dataclass(frozen=True, slots=True)
class Rollout:
    """Weighted variants of one key; `salt` "" means the key."""

    variants: tuple[Variant, ...]
    salt: str = ""
    bucket_by: BucketBy = BucketBy.USER_ID
    algorithm: Algorithm = Algorithm.FLAGD_FRACTIONAL_V2

    @property
    def total_weight(self) -> int:
        return sum(v.weight for v in self.variants)

    def to_json(self) -> dict[str, Any]:
        """The stored form: {"$rollout": {...}}."""
        return {
            ENVELOPE: {
                "algorithm": self.algorithm.value,
                "salt": self.salt,
                "bucket_by": self.bucket_by.value,
                "variants": [{"name": v.name, "value": v.value, "weight": v.weight} for v in self.variants],
            }
        }


def bucket(salt: str, bucketing_id: str, total_weight: int) -> int:
    """flagd fractional v2: the bucket (0 <= bucket < total_weight) of `bucketing_id` under `salt`."""
    hashed = mmh3.hash((salt + bucketing_id).encode(), 0, signed=False)
    return (hashed * total_weight) >> 32


def assign(rollout: Rollout, key: str, user_id: str, org_id: str) -> tuple[JsonValue, RolloutAssignment]:
    """The subject's variant: its value and the assignment provenance reports. A subject without the id
    the rollout buckets by (a read at an ORG or GLOBAL scope) is bucketed as the empty id."""
    salt = rollout.salt or key
    bucketing_id = user_id if rollout.bucket_by is BucketBy.USER_ID else org_id
    total = rollout.total_weight
    position = bucket(salt, bucketing_id, total)
    cumulative = 0
    chosen = rollout.variants[-1]
    for variant in rollout.variants:
        cumulative += variant.weight
        if position < cumulative:
            chosen = variant
            break
    return chosen.value, RolloutAssignment(chosen.name, position, total, salt, rollout.bucket_by.value)


def is_rollout(value: JsonValue) -> bool:
    """Whether a stored value is a rollout envelope."""
    return isinstance(value, dict) and len(value) == 1 and ENVELOPE in value


def from_json(value: JsonValue) -> Rollout:
    """The rollout of a stored envelope (written by to_json, so trusted to have its shape)."""
    body: Mapping[str, Any] = value[ENVELOPE]
    return Rollout(
        variants=tuple(Variant(v["name"], v["value"], int(v["weight"])) for v in body["variants"]),
        salt=str(body.get("salt", "")),
        bucket_by=BucketBy(body.get("bucket_by", BucketBy.USER_ID.value)),
        algorithm=Algorithm(body.get("algorithm", Algorithm.FLAGD_FRACTIONAL_V2.value)),
    )


def shape_problems(rollout: Rollout) -> list[tuple[str, str]]:
    """(field, problem) for everything wrong with a rollout apart from its variants' values."""
    problems: list[tuple[str, str]] = []
    if not rollout.variants:
        problems.append(("variants", "must name at least one variant"))
    if len(rollout.variants) > MAX_VARIANTS:
        problems.append(("variants", f"must have at most {MAX_VARIANTS} variants"))
    if len(rollout.salt) > MAX_SALT_LENGTH:
        problems.append(("salt", f"must be at most {MAX_SALT_LENGTH} characters"))
    seen: set[str] = set()
    for i, variant in enumerate(rollout.variants[:MAX_VARIANTS]):
        if not VARIANT_NAME.fullmatch(variant.name):
            problems.append((f"variants[{i}].name", "must be 1-64 of [A-Za-z0-9_.-], starting with a letter"))
        elif variant.name in seen:
            problems.append((f"variants[{i}].name", f"{variant.name} appears more than once"))
        seen.add(variant.name)
        if not 0 <= variant.weight <= MAX_WEIGHT:
            problems.append((f"variants[{i}].weight", f"must be 0-{MAX_WEIGHT}"))
    if rollout.variants and all(0 <= v.weight for v in rollout.variants) and rollout.total_weight <= 0:
        problems.append(("variants", "weights must not sum to 0"))
    return problems


def variant_values(rollout: Rollout) -> Sequence[tuple[int, JsonValue]]:
    """(index, value) of each variant, for checking the values against the key's definition."""
    return [(i, v.value) for i, v in enumerate(rollout.variants)]
