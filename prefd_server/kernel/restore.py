"""Restoring scopes' preference overrides to a target state: the protocol rollback calls, its results."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import asyncpg

from prefd_server.kernel.model import CallInfo, JsonValue, KeyChange, ResolvedValue, Scope
from prefd_server.kernel.parts import Slot

# The value each key should have at a scope (None or absent: no override), read on the restorer's
# connection inside its transaction (called again once the scopes are locked).
TargetState = Callable[[asyncpg.Connection, Scope], Awaitable[Mapping[str, JsonValue | None]]]


@dataclass(frozen=True, slots=True)
class RestoreRequest:
    """Which scopes to restore, to what, and what the written change rows record."""

    scopes: Sequence[Scope]
    target: TargetState
    keys: Sequence[str]  # only these keys; empty: every key set now or in the target
    org_id: str  # the org whose layer USER scopes resolve through ("" for none)
    rollback_of: str  # what the change rows say they roll back to
    call: CallInfo
    reason: str


@dataclass(frozen=True, slots=True)
class ScopeRestored:
    """One scope's outcome: its changes and its effective values after them."""

    scope: Scope
    changes: Sequence[KeyChange]
    effective: Sequence[ResolvedValue]


class ScopeRestorer(Protocol):
    """Writes scopes' overrides back to a target state, all scopes in one transaction."""

    async def preview(self, request: RestoreRequest) -> tuple[list[ScopeRestored], str]:
        """What restoring would do, per requested scope, and the token of the state it saw."""
        ...

    async def apply(self, request: RestoreRequest, expected_token: str) -> list[ScopeRestored]:
        """Restore, per requested scope; with `expected_token`, StaleRollback if the state moved on."""
        ...


RESTORER: Slot[ScopeRestorer] = Slot("scope restorer")
