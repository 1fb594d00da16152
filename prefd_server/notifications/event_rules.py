"""Event rules (`notifications.event_rules`): their validation on write and their lenient reading at decide time."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prefd_server.kernel.conditions import condition_problems
from prefd_server.notifications.model import MAX_NAME_LENGTH, Channel, Priority, ThrottleRule

MAX_EVENT_RULES = 256
MAX_THROTTLE_MINUTES = 10080  # one week
MAX_THROTTLE_LIMIT = 10000
RULE_FIELDS = ("enabled", "channels", "priority", "throttle_minutes", "throttle_limit", "conditions")


@dataclass(frozen=True, slots=True)
class EventRule:
    """One event type's rule as read at decide time (a malformed field reads as its safest meaning)."""

    enabled: bool = True
    channels: frozenset[Channel] | None = None  # None: every channel
    priority: Priority | None = None
    throttle: ThrottleRule | None = None
    conditions: Any = field(default_factory=dict)  # checked again by conditions_met
    problems: tuple[str, ...] = ()


def _whole(value: object) -> int | None:
    """`value` as an int when it is a whole number (JSON numbers may arrive as floats: 60.0 is 60)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value)


def _int_problem(value: object, low: int, high: int) -> str | None:
    number = _whole(value)
    if number is not None and low <= number <= high:
        return None
    return f"must be an int in {low}..{high}"


def _channels_problem(value: object) -> str | None:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return "must be a list of channel names"
    unknown = [item for item in value if item not in Channel.__members__]
    if unknown:
        return f"unknown channels {unknown[:5]} (known: {', '.join(Channel.__members__)})"
    if len(set(value)) != len(value):
        return "must not repeat a channel"
    return None


def event_rule_problems(rule: object) -> list[str]:
    """Everything wrong with one event type's rule, each as "<field>: <problem>" (empty when valid)."""
    if not isinstance(rule, Mapping):
        return ["must be an object"]
    problems = [
        f"{str(name)[:40]!r}: unknown field (known: {', '.join(RULE_FIELDS)})"
        for name in rule
        if name not in RULE_FIELDS
    ]
    checks: dict[str, Callable[[object], str | None]] = {
        "enabled": lambda v: None if isinstance(v, bool) else "must be a bool",
        "channels": _channels_problem,
        "priority": lambda v: (
            None
            if isinstance(v, str) and v in Priority.__members__
            else f"must be one of {', '.join(Priority.__members__)}"
        ),
        "throttle_minutes": lambda v: _int_problem(v, 0, MAX_THROTTLE_MINUTES),
        "throttle_limit": lambda v: _int_problem(v, 1, MAX_THROTTLE_LIMIT),
    }
    for name, check in checks.items():
        if name in rule and (problem := check(rule[name])):
            problems.append(f"{name}: {problem}")
    problems += [f"conditions.{problem}" for problem in condition_problems(rule.get("conditions", {}))]
    return problems


def event_rules_problems(value: object) -> list[str]:
    """Everything wrong with a `notifications.event_rules` value, each as "<event type>.<field>: <problem>"."""
    if not isinstance(value, Mapping):
        return ["must be an object of event type -> rule"]
    if len(value) > MAX_EVENT_RULES:
        return [f"must have at most {MAX_EVENT_RULES} event types (got {len(value)})"]
    problems: list[str] = []
    for event_type, rule in value.items():
        if not isinstance(event_type, str) or not 1 <= len(event_type) <= MAX_NAME_LENGTH:
            problems.append(f"{str(event_type)[:40]!r}: event types must be 1-{MAX_NAME_LENGTH} characters")
            continue
        problems += [f"{event_type}.{problem}" for problem in event_rule_problems(rule)]
    return problems


def read_event_rule(rules: object, event_type: str) -> EventRule | None:
    """The rule for `event_type` in a resolved `notifications.event_rules` value, or None when it has none.

    Never raises: a malformed field reads as disabled (enabled), no channel (channels), no priority, no
    throttle; malformed conditions are kept so that they count as not met; `problems` says what was off.
    """
    if not isinstance(rules, Mapping) or event_type not in rules:
        return None
    raw = rules[event_type]
    if not isinstance(raw, Mapping):
        return EventRule(enabled=False, problems=("must be an object",))
    channels: frozenset[Channel] | None = None
    if "channels" in raw:
        listed = raw["channels"] if isinstance(raw["channels"], list) else []
        channels = frozenset(
            Channel.__members__[name] for name in listed if isinstance(name, str) and name in Channel.__members__
        )
    priority = raw.get("priority")
    minutes, limit = _whole(raw.get("throttle_minutes", 0)) or 0, _whole(raw.get("throttle_limit", 1)) or 1
    throttled = _int_problem(minutes, 1, MAX_THROTTLE_MINUTES) is None
    return EventRule(
        enabled=raw.get("enabled", True) is True,
        channels=channels,
        priority=Priority[priority] if isinstance(priority, str) and priority in Priority.__members__ else None,
        throttle=ThrottleRule(limit if _int_problem(limit, 1, MAX_THROTTLE_LIMIT) is None else 1, minutes * 60)
        if throttled
        else None,
        conditions=raw.get("conditions", {}),
        problems=tuple(event_rule_problems(raw)),
    )
