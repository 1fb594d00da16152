"""Write-time checks of setting values whose shape a definition's type cannot express, by definition key."""

from __future__ import annotations

from collections.abc import Callable

from prefd_server.kernel.model import JsonValue
from prefd_server.kernel.parts import Slot

# Everything wrong with a value (empty when it is fine); each problem completes "<key> ...".
ValueCheck = Callable[[JsonValue], list[str]]


class ValueChecks:
    """The checks domains register for definition keys; the preference writer runs them on every value
    it stores and on every definition default, after the value has passed its definition's type checks."""

    def __init__(self) -> None:
        self._checks: dict[str, list[ValueCheck]] = {}

    def add(self, key: str, check: ValueCheck) -> None:
        """Check every value of `key` with `check` too (a key may have several checks; all must pass)."""
        self._checks.setdefault(key, []).append(check)

    def problems(self, key: str, value: JsonValue) -> list[str]:
        """What every check of `key` finds wrong with `value` (empty for a key without checks)."""
        return [problem for check in self._checks.get(key, ()) for problem in check(value)]

    def keys(self) -> frozenset[str]:
        """The keys that have at least one check."""
        return frozenset(self._checks)


# Filled by preferences (which runs the checks); domains registered after it add their own checks.
VALUE_CHECKS: Slot[ValueChecks] = Slot("value checks")
