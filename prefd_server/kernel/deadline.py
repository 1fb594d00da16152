"""Every call ends by its deadline: the time budget an RPC runs under, and the database breaker.

The RPC wrapper starts a budget for each call: the client's deadline, capped by a server-side
ceiling for unary calls (a call without a deadline cannot hold the server for ever). Streams are
long-lived and get no ceiling, only the client's deadline if it set one. The database pool reads
the budget of the task that asks for a connection: acquiring and holding a connection are bounded
by it, and every single database visit by the ceiling, streams included. Work a call spawns (a
shared cache load) shares its budget while the call runs; once the call has ended, such work (a
background job that outlives its request) is bounded per visit by the ceiling only. Outside any
call (the feed reader, the health monitor) nothing is bounded here.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from typing import Any

from prefd_server.kernel.errors import Code, DatabaseUnavailable, PrefdError

# Upper bound of a unary call without a client deadline, and of any one database visit.
DEFAULT_CALL_TIMEOUT_S = 30.0


class CallDeadlineExceeded(PrefdError):
    """The call's deadline (the client's, or the server's ceiling) passed before it was done."""

    code = Code.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class CallBudget:
    """The time one RPC may take (monotonic clock), read lazily: most calls never ask."""

    __slots__ = ("_context", "_deadline", "_limit", "ceiling_s", "task")

    def __init__(self, context: Any, ceiling_s: float, stream: bool) -> None:
        self._context = context
        self.ceiling_s = ceiling_s
        self._limit = math.inf if stream else time.monotonic() + ceiling_s
        self._deadline: float | None = None
        # The task handling the call; None once the call has ended.
        self.task: asyncio.Task[Any] | None = asyncio.current_task()

    def deadline(self) -> float:
        """When the call must be over: the client's deadline or the ceiling, whichever comes first."""
        if self._deadline is None:
            remaining = self._context.time_remaining()
            self._deadline = self._limit if remaining is None else min(self._limit, time.monotonic() + remaining)
        return self._deadline

    def passed(self) -> bool:
        """Whether the call's deadline has passed."""
        return time.monotonic() >= self.deadline()


_budget: contextvars.ContextVar[CallBudget | None] = contextvars.ContextVar("prefd_call_budget", default=None)


def start_call(context: Any, ceiling_s: float, stream: bool = False) -> CallBudget:
    """Start the budget of the RPC handled in this context (the wrapper calls this first)."""
    budget = CallBudget(context, ceiling_s, stream)
    _budget.set(budget)
    return budget


def end_call(budget: CallBudget) -> None:
    """The call is over: work it spawned is on its own from now on."""
    budget.task = None


def deadline_passed() -> bool:
    """Whether this context runs a call whose deadline has passed."""
    budget = _budget.get()
    return budget is not None and budget.passed()


def visit_deadline() -> float | None:
    """When a database visit starting now must be over (monotonic), or None outside any call."""
    budget = _budget.get()
    if budget is None:
        return None
    limit = time.monotonic() + budget.ceiling_s
    if budget.task is not None:
        return min(limit, budget.deadline())
    return limit


def outside_call() -> contextvars.Context:
    """A copy of this context without the call's budget, for work shared by many calls (health
    probes) that bounds itself."""
    context = contextvars.copy_context()
    context.run(_budget.set, None)
    return context


class DatabaseBreaker:
    """Open while the health monitor finds PostgreSQL unreachable: calls that need it fail at once
    with UNAVAILABLE instead of each waiting out its deadline; it closes when the monitor sees the
    database again."""

    __slots__ = ("_opened_at",)

    def __init__(self) -> None:
        self._opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def record(self, reachable: bool) -> None:
        """The health monitor's latest finding."""
        if reachable:
            self._opened_at = None
        elif self._opened_at is None:
            self._opened_at = time.monotonic()

    def check(self) -> None:
        """DatabaseUnavailable while open."""
        if self._opened_at is not None:
            down_s = time.monotonic() - self._opened_at
            raise DatabaseUnavailable(
                f"PostgreSQL has not answered the health check for {down_s:.1f} s; retry later",
                down_for_s=f"{down_s:.1f}",
            )
