"""Resolution of effective values (default <- GLOBAL <- ORG <- USER) and dot-path nesting."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from prefd_server.kernel.model import JsonValue, Layer, ResolvedValue, Scope, ScopeKind, Shadowed
from prefd_server.preferences.model import Definition, StoredValue
from prefd_server.preferences.policy import Policy, is_policy, refusal
from prefd_server.preferences.policy import from_json as policy_from_json
from prefd_server.preferences.rollout import assign, from_json, is_rollout

# Overrides stored at one scope, by key.
ScopeOverrides = Mapping[str, StoredValue]


def resolve(
    definitions: Iterable[Definition],
    layers: Sequence[tuple[Layer, Scope, ScopeOverrides]],
) -> list[ResolvedValue]:
    """Each definition's value from the most specific layer that sets it, in definition order.

    `layers` runs least specific first; a layer counts only if the definition lets its
    scope kind override the key, and only if no policy of a layer above shadows it (provenance lists
    what was shadowed). A rollout (as default or override) gives the subject's variant: the subject is
    the one whose USER and ORG scopes are among the layers.
    """
    user_id = next((scope.id for _, scope, _ in layers if scope.kind is ScopeKind.USER), "")
    org_id = next((scope.id for _, scope, _ in layers if scope.kind is ScopeKind.ORG), "")
    resolved = []
    for definition in definitions:
        chosen = ResolvedValue(
            key=definition.key,
            value=definition.default,
            layer=Layer.DEFAULT,
            scope=None,
            version=definition.version,
            updated_at=definition.updated_at,
            updated_by=definition.updated_by,
        )
        # Built only for a key some layer holds a policy for (most keys have none: no lists per key).
        policies: list[tuple[Scope, Policy]] | None = None
        shadowed: list[Shadowed] | None = None
        for layer, scope, overrides in layers:
            stored = overrides.get(definition.key)
            if stored is None or scope.kind not in definition.scopes:
                continue
            value = stored.value
            shadowing = _shadowing(policies, value) if policies else None
            if shadowing is not None:
                shadowed = shadowed or []
                shadowed.append(Shadowed(scope, stored.version, *shadowing))
                continue
            if is_policy(value):
                policy = policy_from_json(value)
                policies = policies or []
                policies.append((scope, policy))
                value = policy.value
            chosen = ResolvedValue(
                key=definition.key,
                value=value,
                layer=layer,
                scope=scope,
                version=stored.version,
                updated_at=stored.updated_at,
                updated_by=stored.updated_by,
            )
        if shadowed:
            chosen = replace(chosen, shadowed=tuple(shadowed))
        if is_rollout(chosen.value):
            value, assignment = assign(from_json(chosen.value), definition.key, user_id, org_id)
            chosen = replace(chosen, value=value, rollout=assignment)
        resolved.append(chosen)
    return resolved


def _shadowing(policies: Sequence[tuple[Scope, Policy]], value: JsonValue) -> tuple[Scope, str] | None:
    """The first policy above that keeps a stored value from applying: (its scope, the rule)."""
    for scope, policy in policies:
        rule = refusal(policy, value)
        if rule is not None:
            return scope, rule
    return None


def nest(flat: Mapping[str, JsonValue]) -> dict[str, JsonValue]:
    """Dot paths to nested objects: {"a.b": 1, "a.c": 2} -> {"a": {"b": 1, "c": 2}}.

    Definition keys never prefix one another, so no path both holds a value and an object.
    """
    root: dict[str, JsonValue] = {}
    for key in sorted(flat):
        node = root
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = flat[key]
    return root


def flatten(nested: Mapping[str, JsonValue], prefix: str = "") -> dict[str, JsonValue]:
    """The inverse of nest for objects whose leaves are not objects."""
    flat: dict[str, JsonValue] = {}
    for name, value in nested.items():
        path = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def key_selected(definition: Definition, key_prefixes: Sequence[str], categories: Sequence[str]) -> bool:
    """Whether a definition passes the prefix and category filters (each empty = all)."""
    if categories and definition.category not in categories:
        return False
    return not key_prefixes or any(definition.key.startswith(p) for p in key_prefixes)
