"""Request-shape rules of the AI config RPCs: ids, owners, who may read or write a config, update masks."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from prefd_server.aiconfig.model import (
    FIELD_TYPES,
    KEY_SLOTS,
    MODEL_ID_PATTERN,
    SECTIONS,
    AIConfigRecord,
    KeyUpdate,
    ModelInfo,
    Mutation,
    key_problems,
    layer_violations,
    name_problem,
)
from prefd_server.kernel.errors import PermissionDenied, ValidationFailed, invalid
from prefd_server.kernel.ids import id_problem
from prefd_server.kernel.model import FieldViolation, Scope, ScopeKind

if TYPE_CHECKING:
    from prefd_server.rpc.principal import Principal

MAX_REQUEST_ID = 128
MAX_TOKENS_PER_CALL = 10**12
MAX_PRICE_USD_PER_1K = 1000.0
MAX_MODEL_FEATURES = 32
REQUEST_ID_PATTERN = re.compile(rf"[A-Za-z0-9._:@+/-]{{1,{MAX_REQUEST_ID}}}")
_PRIORITY = re.compile(r"-?(0|[1-9][0-9]{0,9})")
# Mask paths below `configuration` and the flat paths each one covers.
_SECTION_PATHS = {s: [p for p in FIELD_TYPES if p.startswith(f"{s}.")] for s in SECTIONS}
_PLAIN_MASK_PATHS = ("name", "priority", "active", "configuration")


@dataclass(frozen=True, slots=True)
class ConfigFields:
    """The plain fields of a config as a request gives them."""

    name: str
    priority: int
    active: bool


# --- ids and owners ------------------------------------------------------------------------


def check_config_id(value: str, field: str = "id") -> str:
    """The config id in canonical form; INVALID_ARGUMENT unless it is a UUID."""
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise invalid(field, "must be a config id (a UUID)") from exc


def owner_scope(user_id: str, org_id: str, is_global: bool, field: str) -> Scope:
    """The scope named by exactly one of user_id, org_id, global."""
    named = [name for name, present in (("user_id", user_id), ("org_id", org_id), ("global", is_global)) if present]
    if len(named) != 1:
        problem = "set exactly one of user_id, org_id or global" + (f" (got {' and '.join(named)})" if named else "")
        fields = [f"{field}.{n}" for n in named] or [field]
        raise ValidationFailed([FieldViolation(f, problem) for f in fields])
    if is_global:
        return Scope(ScopeKind.GLOBAL)
    kind, value = (ScopeKind.USER, user_id) if user_id else (ScopeKind.ORG, org_id)
    id_error = id_problem(value)
    if id_error:
        raise invalid(f"{field}.{named[0]}", id_error)
    return Scope(kind, value)


def check_owner_unchanged(owner: tuple[str, str, bool], scope: Scope) -> None:
    """An update may restate a config's owner but not change it."""
    if any(owner) and owner_scope(*owner, "config") != scope:
        raise invalid("config", "the owner (user_id, org_id, global) of a config cannot change")


def check_request_id(request_id: str) -> None:
    if not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise invalid("request_id", f"must be 1-{MAX_REQUEST_ID} characters of [A-Za-z0-9._:@+/-]")


# --- who may read and write ----------------------------------------------------------------


def require_config_write(principal: Principal, scope: Scope) -> None:
    """A user writes its own USER configs; ORG and GLOBAL configs need admin; services write none."""
    if principal.is_admin:
        return
    principal.require_write(scope)


def require_config_read(principal: Principal, scope: Scope) -> None:
    """Service and admin read any config; a user its own, its org's and the GLOBAL ones."""
    if principal.reads_any:
        return
    if scope.kind is ScopeKind.GLOBAL or scope == Scope(ScopeKind.USER, principal.subject):
        return
    if scope.kind is ScopeKind.ORG and principal.org and scope.id == principal.org:
        return
    raise PermissionDenied(f"{principal.subject} may not read AI configs of {scope}", action="read")


def chain_org(principal: Principal, scope: Scope) -> str:
    """The org a USER config is validated under: the writer's own org when it writes for itself."""
    if scope.kind is ScopeKind.USER and principal.subject == scope.id:
        return principal.org
    return ""


# --- config contents -----------------------------------------------------------------------


def check_new_config(
    name: str, values: Mapping[str, Any], keys: Mapping[str, str], violations: list[FieldViolation]
) -> KeyUpdate | None:
    """Validate a new config (`violations`: those found reading the request); the keys it starts with."""
    problem = name_problem(name)
    if problem:
        violations.insert(0, FieldViolation("config.name", problem))
    violations += layer_violations(values, "config.configuration")
    if violations:
        raise ValidationFailed(violations)
    if keys and "primary" not in keys:
        raise invalid("config.configuration.api_keys.primary", "a secondary key needs a primary key")
    return KeyUpdate(keys, new_primary=bool(keys.get("primary"))) if keys else None


def check_update(paths: Sequence[str], name: str, values: Mapping[str, Any], violations: list[FieldViolation]) -> None:
    """Validate an update's mask and the fields it sets (`violations`: those found reading the request)."""
    for path in paths:
        if path not in _PLAIN_MASK_PATHS:
            _mask_coverage(path)
    if "name" in paths or (not paths and name):
        problem = name_problem(name)
        if problem:
            raise invalid("config.name", problem)
    violations += layer_violations(values, "config.configuration")
    if violations:
        raise ValidationFailed(violations)


def check_new_key(key: str) -> None:
    problems = key_problems(key)
    if problems:
        raise ValidationFailed([FieldViolation("new_key", p) for p in problems])


def masked_update(
    fields: ConfigFields, paths: Sequence[str], values: Mapping[str, Any], keys: Mapping[str, str]
) -> Mutation:
    """The mutation of an UpdateAIConfig: the masked fields taken from the request."""

    def mutate(old: AIConfigRecord | None) -> tuple[AIConfigRecord | None, KeyUpdate | None]:
        assert old is not None
        return apply_mask(old, fields, paths, values, keys)

    return mutate


def activation(active: bool) -> Mutation:
    """The mutation of a SetAIConfigActive."""

    def mutate(old: AIConfigRecord | None) -> tuple[AIConfigRecord | None, KeyUpdate | None]:
        assert old is not None
        return replace(old, active=active), None

    return mutate


def rotation(new_key: str) -> Mutation:
    """The mutation of a RotateAPIKey: `new_key` becomes primary, the primary secondary."""

    def mutate(old: AIConfigRecord | None) -> tuple[AIConfigRecord | None, KeyUpdate | None]:
        assert old is not None
        return old, KeyUpdate({"primary": new_key}, new_primary=True, rotate=True)

    return mutate


class Deletion:
    """The mutation of a DeleteAIConfig; remembers the version the deletion gets."""

    def __init__(self) -> None:
        self.version = 0

    def __call__(self, old: AIConfigRecord | None) -> tuple[AIConfigRecord | None, KeyUpdate | None]:
        assert old is not None
        self.version = old.version + 1
        return None, None


def apply_mask(
    old: AIConfigRecord,
    fields: ConfigFields,
    paths: Sequence[str],
    values: Mapping[str, Any],
    keys: Mapping[str, str],
) -> tuple[AIConfigRecord, KeyUpdate | None]:
    """The stored config with the masked fields taken from the request (unset named fields cleared)."""
    new_values = dict(old.values)
    slots: dict[str, str] = {}
    name, priority, active = old.name, old.priority, old.active
    if not paths:  # AIP-134: every populated field
        name = fields.name or name
        priority = fields.priority or priority
        active = fields.active or active
        new_values.update(values)
        slots.update(keys)
    for path in paths:
        if path == "name":
            name = fields.name
        elif path == "priority":
            priority = fields.priority
        elif path == "active":
            active = fields.active
        elif path == "configuration":
            new_values = dict(values)
            slots = {slot: keys.get(slot, "") for slot in KEY_SLOTS}
        else:
            for flat in _mask_coverage(path):
                if flat in FIELD_TYPES:
                    new_values.pop(flat, None)
                    if flat in values:
                        new_values[flat] = values[flat]
                else:
                    slot = flat.split(".")[1]
                    slots[slot] = keys.get(slot, "")
    if slots.get("primary") == "" and "secondary" not in slots:
        slots["secondary"] = ""
    key_update = None
    if slots:
        key_update = KeyUpdate(slots, new_primary=bool(slots.get("primary")))
    return replace(old, name=name, priority=priority, active=active, values=new_values), key_update


def _mask_coverage(path: str) -> list[str]:
    """Flat paths (and api_keys.<slot>) a configuration.* mask path covers; INVALID_ARGUMENT if unknown."""
    parts = path.split(".")
    if parts[0] == "configuration" and len(parts) in (2, 3) and parts[1] in SECTIONS:
        section = parts[1]
        covered = _SECTION_PATHS[section] + ([f"api_keys.{s}" for s in KEY_SLOTS] if section == "api_keys" else [])
        if len(parts) == 2:
            return covered
        flat = f"{section}.{parts[2]}"
        if flat in covered:
            return [flat]
    raise invalid("update_mask.paths", f"{path!r} cannot be updated")


# --- paging ----------------------------------------------------------------------------------


def page_after(after: str | None) -> tuple[int, str] | None:
    """The (priority, name) a ListAIConfigs page token continues after."""
    if after is None:
        return None
    priority, sep, name = after.partition(":")
    if not sep or not name:
        raise invalid("page_token", "is malformed")
    return _parse_priority(priority), name


def page_key(record: AIConfigRecord) -> str:
    """What a ListAIConfigs page token records of the last config of a page."""
    return f"{record.priority}:{record.name}"


def _parse_priority(text: str) -> int:
    """A config priority (int32) as this server wrote it in a page token."""
    if not _PRIORITY.fullmatch(text) or not -(2**31) <= int(text) < 2**31:
        raise invalid("page_token", "is malformed")
    return int(text)


# --- catalog ---------------------------------------------------------------------------------


def catalog_model(catalog: Mapping[str, ModelInfo], model: str, input_tokens: int, output_tokens: int) -> ModelInfo:
    """The catalog model a cost is asked of; INVALID_ARGUMENT for an unknown model or a token count out of range."""
    violations = [
        FieldViolation(field, f"must be between 0 and {MAX_TOKENS_PER_CALL} (got {count})")
        for field, count in (("input_tokens", input_tokens), ("output_tokens", output_tokens))
        if not 0 <= count <= MAX_TOKENS_PER_CALL
    ]
    info = catalog.get(model)
    if info is None:
        violations.insert(0, FieldViolation("model", f"model {model!r} is not in the catalog"))
    if violations:
        raise ValidationFailed(violations)
    assert info is not None
    return info


def check_model(
    model: str, context_window: int, output_limit: int, prices: Mapping[str, float], features: Sequence[str]
) -> None:
    """Validate a catalog model as UpdateModel gives it (`prices`: USD per 1,000 tokens by field)."""
    violations = []
    if not MODEL_ID_PATTERN.fullmatch(model):
        violations.append(FieldViolation("model.model", "must be 1-128 letters, digits, '.', '_', ':' or '-'"))
    if context_window < 1:
        violations.append(FieldViolation("model.context_window", "must be at least 1"))
    if not 1 <= output_limit <= max(context_window, 1):
        violations.append(FieldViolation("model.output_limit", "must be between 1 and context_window"))
    for field, price in prices.items():
        if not (math.isfinite(price) and 0 <= price <= MAX_PRICE_USD_PER_1K):
            violations.append(FieldViolation(f"model.{field}", f"must be between 0 and {MAX_PRICE_USD_PER_1K}"))
    if len(features) > MAX_MODEL_FEATURES:
        violations.append(FieldViolation("model.features", f"at most {MAX_MODEL_FEATURES} features"))
    violations += [
        FieldViolation(f"model.features[{i}]", "must be 1-64 characters")
        for i, feature in enumerate(features)
        if not 1 <= len(feature) <= 64
    ]
    if violations:
        raise ValidationFailed(violations)
