"""Usage and budgets: budget periods, threshold crossings, and per-period spend mirrored in Redis counters.

The usage ledger in PostgreSQL is the truth; Redis counters hold each user's spend per period so
GetBudgetStatus need not read the ledger. A counter is only ever raised, so a late write cannot
lower it; a user whose counters missed an update is read from the ledger until they are rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Protocol

from prefd_server.aiconfig.model import EffectiveAIConfig
from prefd_server.kernel.errors import RequestIdReused
from prefd_server.kernel.model import CallInfo, FieldViolation, Subject
from prefd_server.kernel.redis import RedisLayers

PERIODS = ("daily", "weekly", "monthly")
# Budget counters outlive their period by a day (a month is at most 31 days).
COUNTER_TTL_S = 32 * 86400


def period_starts(moment: datetime) -> dict[str, date]:
    """The UTC day, ISO week (Monday) and month that `moment` falls in."""
    day = (moment if moment.tzinfo is None else moment.astimezone(UTC)).date()
    return {"daily": day, "weekly": day - timedelta(days=day.weekday()), "monthly": day.replace(day=1)}


def user_counters_prefix(user_id: str) -> str:
    """The prefix of every usage counter of one user (erasure deletes them all)."""
    return f"usage:{user_id}:"


def counter_name(user_id: str, period: str, start: date) -> str:
    """The Redis counter of a user's spend (nano-USD) in the period starting at `start`."""
    return f"{user_counters_prefix(user_id)}{period}:{start}"


@dataclass(frozen=True, slots=True)
class Generation:
    """One generation's token usage as its caller reports it; `request_id` makes reporting it idempotent."""

    subject: Subject
    model: str
    input_tokens: int
    output_tokens: int
    request_id: str


@dataclass(frozen=True, slots=True)
class Budgets:
    """A subject's budget per period (nano-USD) and the fractions of it that raise an alert."""

    nanos: dict[str, int]
    thresholds: Sequence[float]

    @classmethod
    def of(cls, effective: EffectiveAIConfig) -> Budgets:
        return cls(effective.budgets_nanos, effective.values["cost_budget.alert_thresholds"])


@dataclass(frozen=True, slots=True)
class Crossing:
    """Spend in a period reached threshold * budget with this record."""

    period: str
    threshold: float
    period_start: date
    spent_nanos: int
    budget_nanos: int
    user_id: str
    request_id: str

    def document(self) -> dict[str, object]:
        return {
            "period": self.period,
            "threshold": self.threshold,
            "period_start": self.period_start.isoformat(),
            "spent_nanos": self.spent_nanos,
            "budget_nanos": self.budget_nanos,
            "request_id": self.request_id,
        }


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """A ledger row and what recording it did."""

    cost_nanos: int
    recorded: bool
    recorded_at: datetime
    totals: dict[str, tuple[date, int]]  # period -> (start, total nanos after this record)
    crossings: list[Crossing]


@dataclass(frozen=True, slots=True)
class PeriodStatus:
    """A user's spend against one period's budget."""

    period: str
    start: date
    spent_nanos: int
    budget_nanos: int
    thresholds_crossed: list[float]

    @property
    def exceeded(self) -> bool:
        return self.spent_nanos >= self.budget_nanos


def reached(spent: int, budget: int, threshold: float) -> bool:
    """spent >= threshold * budget, in exact decimal arithmetic (nano-USD)."""
    return spent >= Decimal(repr(threshold)) * budget


def crossed(before: int, after: int, budget: int, thresholds: Sequence[float]) -> list[float]:
    """Thresholds t with before < t * budget <= after."""
    if budget <= 0:
        return []
    return [t for t in thresholds if reached(after, budget, t) and not reached(before, budget, t)]


def budget_status(starts: Mapping[str, date], spent: Mapping[str, int], budgets: Budgets) -> list[PeriodStatus]:
    """Each period's spend against its budget and the thresholds it has reached."""
    return [
        PeriodStatus(
            period,
            start,
            spent[period],
            budgets.nanos[period],
            [
                t
                for t in budgets.thresholds
                if budgets.nanos[period] > 0 and reached(spent[period], budgets.nanos[period], t)
            ],
        )
        for period, start in starts.items()
    ]


def check_replay(sent: Generation, recorded: Generation) -> None:
    """A request_id reported again must carry the figures it was recorded with (else INVALID_ARGUMENT)."""
    figures = {
        "subject.user_id": (sent.subject.user_id, recorded.subject.user_id),
        "subject.org_id": (sent.subject.org_id, recorded.subject.org_id),
        "model": (sent.model, recorded.model),
        "input_tokens": (sent.input_tokens, recorded.input_tokens),
        "output_tokens": (sent.output_tokens, recorded.output_tokens),
    }
    differing = [
        FieldViolation(field, f"request_id {sent.request_id!r} was recorded with {old!r}, not {new!r}")
        for field, (new, old) in figures.items()
        if new != old
    ]
    if differing:
        raise RequestIdReused(differing)


class UsageLedgerStore(Protocol):
    """The store operations the usage ledger needs."""

    async def record_usage(
        self, generation: Generation, budgets: Budgets, call: CallInfo
    ) -> tuple[UsageRecord, int | None]: ...

    async def usage_totals(self, user_id: str, starts: dict[str, date]) -> dict[str, int]: ...


class UsageLedger:
    """Records usage with its threshold crossings and reads per-period spend (Redis first, else the ledger)."""

    def __init__(
        self, store: UsageLedgerStore, redis: RedisLayers | None, on_budget_commit: Callable[[int], None]
    ) -> None:
        self._store = store
        self._redis = redis
        self._on_budget_commit = on_budget_commit
        self._counters_suspect: set[str] = set()  # users whose Redis mirror missed an update

    async def record(self, generation: Generation, effective: EffectiveAIConfig, call: CallInfo) -> UsageRecord:
        """Append a generation to the ledger under the subject's effective budgets; raise its counters."""
        record, xid = await self._store.record_usage(generation, Budgets.of(effective), call)
        if xid is not None:
            self._on_budget_commit(xid)
        user_id = generation.subject.user_id
        if record.recorded and self._redis is not None:
            counters = {counter_name(user_id, p, start): total for p, (start, total) in record.totals.items()}
            if not await self._redis.raise_counters(counters, COUNTER_TTL_S):
                self._counters_suspect.add(user_id)
        return record

    async def status(self, user_id: str, effective: EffectiveAIConfig) -> list[PeriodStatus]:
        """The user's spend in the current periods against the effective budgets."""
        starts = period_starts(datetime.now(UTC))
        return budget_status(starts, await self.spent(user_id, starts), Budgets.of(effective))

    async def spent(self, user_id: str, starts: Mapping[str, date]) -> dict[str, int]:
        """Spend per period: Redis counters when they are all there and trusted, else the ledger totals."""
        names = {period: counter_name(user_id, period, start) for period, start in starts.items()}
        if self._redis is not None and user_id not in self._counters_suspect:
            found = await self._redis.counters(list(names.values()))
            if found is not None and len(found) == len(names):
                return {period: found[name] for period, name in names.items()}
        totals = await self._store.usage_totals(user_id, dict(starts))
        if self._redis is not None and await self._redis.raise_counters(
            {names[p]: total for p, total in totals.items()}, COUNTER_TTL_S
        ):
            self._counters_suspect.discard(user_id)
        return totals
