"""prefd.v1.StatisticsService: checks the request, reads the figures in one statement, maps them."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any, TypeAlias

import asyncpg
import grpc

from prefd.v1 import statistics_pb2, statistics_pb2_grpc
from prefd_server.kernel.db import translated_errors
from prefd_server.kernel.errors import ValidationFailed, invalid
from prefd_server.kernel.ids import id_problem, key_problem
from prefd_server.kernel.model import FieldViolation
from prefd_server.kernel.parts import KeyCatalog, KeyFacts
from prefd_server.kernel.tokens import TokenKey
from prefd_server.rpc import convert
from prefd_server.statistics import figures_store as store
from prefd_server.statistics.convert import (
    adoption_to_pb,
    key_statistics_to_pb,
    popular_to_pb,
    rollups_to_pb,
    scope_kind_from_pb,
)
from prefd_server.statistics.model import (
    ALL_ORGS,
    DEFAULT_TOP_N,
    MAX_ROLLUP_DAYS,
    MAX_TOP_N,
    CategoryNotFound,
    KeyNotFound,
    SensitiveValues,
    scope_kind_column,
)
from prefd_server.statistics.rules import rollup_days

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _date(text: str, field: str, violations: list[FieldViolation]) -> date | None:
    try:
        if len(text) == 10:
            return date.fromisoformat(text)
    except ValueError:
        pass
    violations.append(FieldViolation(field, "must be a date YYYY-MM-DD"))
    return None


def _org(org_id: str) -> str:
    """The org a request counts within (ALL_ORGS when empty), checked."""
    if org_id:
        problem = id_problem(org_id)
        if problem:
            raise invalid("org_id", problem)
    return org_id or ALL_ORGS


class StatisticsService(statistics_pb2_grpc.StatisticsServiceServicer):
    """Key statistics, popular values per category, adoption and daily rollups (service or admin)."""

    SERVICE_NAME: str = statistics_pb2.DESCRIPTOR.services_by_name["StatisticsService"].full_name
    add_to_server = staticmethod(statistics_pb2_grpc.add_StatisticsServiceServicer_to_server)

    def __init__(self, pool: asyncpg.Pool, catalog: KeyCatalog, tokens: TokenKey) -> None:
        self._pool = pool
        self._catalog = catalog
        self._tokens = tokens

    async def _facts(self, key: str) -> KeyFacts:
        problem = key_problem(key)
        if problem:
            raise invalid("key", problem)
        facts = await self._catalog.key_facts(key)
        if facts is None:
            raise KeyNotFound(key)
        return facts

    async def GetKeyStatistics(
        self, request: statistics_pb2.GetKeyStatisticsRequest, context: Context
    ) -> statistics_pb2.GetKeyStatisticsResponse:
        facts = await self._facts(request.key)
        org = _org(request.org_id)
        asked = request.HasField("top_n")
        if asked and not 0 <= request.top_n <= MAX_TOP_N:
            raise invalid("top_n", f"must be between 0 and {MAX_TOP_N}")
        if facts.sensitive and asked and request.top_n > 0:
            raise SensitiveValues(facts.key, "top_n")
        top_n = request.top_n if asked else (0 if facts.sensitive else DEFAULT_TOP_N)
        kind = scope_kind_from_pb(request.scope_kind)
        async with translated_errors(), self._pool.acquire() as conn:
            figures, cursor = await store.key_figures(conn, facts.key, org, scope_kind_column(kind), top_n)
        return statistics_pb2.GetKeyStatisticsResponse(
            statistics=key_statistics_to_pb(facts, org, kind, figures),
            cursor=convert.cursor_to_pb(cursor, self._tokens),
        )

    async def GetCategoryStatistics(
        self, request: statistics_pb2.GetCategoryStatisticsRequest, context: Context
    ) -> statistics_pb2.GetCategoryStatisticsResponse:
        if not request.category:
            raise invalid("category", "must not be empty")
        org = _org(request.org_id)
        keys = await self._catalog.category_keys(request.category)
        if not keys:
            raise CategoryNotFound(request.category)
        sensitive = {facts.key: facts.sensitive for facts in keys}
        kind = scope_kind_from_pb(request.scope_kind)
        async with translated_errors(), self._pool.acquire() as conn:
            popular, cursor = await store.popular_values(conn, list(sensitive), org, scope_kind_column(kind))
        popular.sort(key=lambda p: (-p.holders, p.key))
        return statistics_pb2.GetCategoryStatisticsResponse(
            keys=[popular_to_pb(p, sensitive[p.key]) for p in popular],
            cursor=convert.cursor_to_pb(cursor, self._tokens),
        )

    async def GetAdoption(
        self, request: statistics_pb2.GetAdoptionRequest, context: Context
    ) -> statistics_pb2.GetAdoptionResponse:
        facts = await self._facts(request.key)
        async with translated_errors(), self._pool.acquire() as conn:
            figures, cursor = await store.adoption(conn, facts.key, facts.default)
        response = adoption_to_pb(facts.key, facts.sensitive, figures)
        response.cursor.CopyFrom(convert.cursor_to_pb(cursor, self._tokens))
        return response

    async def ListDailyRollups(
        self, request: statistics_pb2.ListDailyRollupsRequest, context: Context
    ) -> statistics_pb2.ListDailyRollupsResponse:
        violations: list[FieldViolation] = []
        problem = key_problem(request.key)
        if problem:
            violations.append(FieldViolation("key", problem))
        start = _date(request.start_date, "start_date", violations)
        end = _date(request.end_date, "end_date", violations)
        if start and end and end < start:
            violations.append(FieldViolation("end_date", "must not be before start_date"))
        elif start and end and end - start >= timedelta(days=MAX_ROLLUP_DAYS):
            violations.append(FieldViolation("end_date", f"must be less than {MAX_ROLLUP_DAYS} days after start_date"))
        if violations:
            raise ValidationFailed(violations)
        assert start is not None and end is not None
        facts = await self._facts(request.key)
        async with translated_errors(), self._pool.acquire() as conn:
            rows, before, cursor = await store.daily_rows(conn, facts.key, start, end)
        return statistics_pb2.ListDailyRollupsResponse(
            rollups=rollups_to_pb(rollup_days(start, end, rows, before), facts.sensitive),
            cursor=convert.cursor_to_pb(cursor, self._tokens),
        )
