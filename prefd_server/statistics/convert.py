"""Statistics figures as prefd.v1 statistics messages, and the request fields that name a scope kind."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from prefd.v1 import common_pb2, statistics_pb2
from prefd_server.kernel.model import ScopeKind
from prefd_server.kernel.parts import KeyFacts
from prefd_server.rpc import convert
from prefd_server.statistics.model import ALL_KINDS, AdoptionFigures, DayRow, KeyFigures, Popular, ValueCount

_KINDS: dict[int, ScopeKind] = {
    common_pb2.SCOPE_KIND_GLOBAL: ScopeKind.GLOBAL,
    common_pb2.SCOPE_KIND_ORG: ScopeKind.ORG,
    common_pb2.SCOPE_KIND_USER: ScopeKind.USER,
}
_KIND_NUMBERS: dict[ScopeKind, Any] = {kind: number for number, kind in _KINDS.items()}


def scope_kind_from_pb(number: int) -> ScopeKind | None:
    """The scope kind a request counts (None: every kind); the input limits admit known numbers only."""
    return _KINDS.get(number)


def value_count_to_pb(count: ValueCount, total: int) -> statistics_pb2.ValueCount:
    """One value with its holders and share of `total`."""
    return statistics_pb2.ValueCount(
        value=convert.value_to_pb(json.loads(count.value_json)),
        value_json=count.value_json,
        holders=count.holders,
        share=count.holders / total if total else 0.0,
    )


def key_statistics_to_pb(
    facts: KeyFacts, org: str, kind: ScopeKind | None, figures: KeyFigures
) -> statistics_pb2.KeyStatistics:
    """A key's statistics at `kind` within `org` (ALL_ORGS: every scope): holders, the top values and the
    rest as "other"."""
    total = figures.holders_by_kind.get(ALL_KINDS if kind is None else kind.value, 0)
    shown = sum(v.holders for v in figures.top)
    return statistics_pb2.KeyStatistics(
        key=facts.key,
        category=facts.category,
        sensitive=facts.sensitive,
        scope_kind=common_pb2.SCOPE_KIND_UNSPECIFIED if kind is None else _KIND_NUMBERS[kind],
        holders=total,
        holders_by_scope_kind=[
            statistics_pb2.ScopeKindHolders(scope_kind=number, holders=figures.holders_by_kind.get(k.value, 0))
            for k, number in _KIND_NUMBERS.items()
        ],
        values=[value_count_to_pb(v, total) for v in figures.top],
        other_holders=total - shown,
        distinct_values=0 if facts.sensitive else figures.distinct_values,
        org_id=org,
    )


def popular_to_pb(popular: Popular, sensitive: bool) -> statistics_pb2.PopularValue:
    """A key's most held value (left unset for a sensitive key)."""
    most_common = popular.most_common if not sensitive else None
    return statistics_pb2.PopularValue(
        key=popular.key,
        sensitive=sensitive,
        holders=popular.holders,
        most_common=value_count_to_pb(most_common, popular.holders) if most_common else None,
    )


def adoption_to_pb(key: str, sensitive: bool, figures: AdoptionFigures) -> statistics_pb2.GetAdoptionResponse:
    """Adoption of a key among known users (the cursor is added by the caller)."""
    known = figures.known_users
    response = statistics_pb2.GetAdoptionResponse(
        key=key,
        users_overriding=figures.users_overriding,
        known_users=known,
        adoption_rate=figures.users_overriding / known if known else 0.0,
    )
    if not sensitive:
        response.users_at_default_value = figures.users_at_default
    return response


def rollups_to_pb(days: Sequence[DayRow], sensitive: bool) -> list[statistics_pb2.DailyRollup]:
    """One message per day (most common values left out for a sensitive key)."""
    return [
        statistics_pb2.DailyRollup(
            date=day.day.isoformat(),
            changes=day.changes,
            holders=day.holders,
            users=day.users,
            most_common=value_count_to_pb(day.most_common, day.holders)
            if day.most_common is not None and not sensitive
            else None,
        )
        for day in days
    ]
