"""prefd.v1.AIConfigService."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeAlias

import grpc

from prefd.v1 import ai_config_pb2, ai_config_pb2_grpc, common_pb2
from prefd_server.aiconfig import convert as ai_convert
from prefd_server.aiconfig import usage_store as ai_usage
from prefd_server.aiconfig.cache import AIConfigCache, Resolved
from prefd_server.aiconfig.model import (
    FIELD_TYPES,
    MODEL_ID_PATTERN,
    SECTIONS,
    AIConfigRecord,
    ModelInfo,
    key_problems,
    layer_violations,
    name_problem,
    nanos_to_usd,
    usd_to_nanos,
)
from prefd_server.aiconfig.usage_store import reached
from prefd_server.aiconfig.writes import AIConfigStore, KeyUpdate, Mutation
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.errors import PermissionDenied, ValidationFailed, invalid
from prefd_server.kernel.feed import FeedReader
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.ids import id_problem
from prefd_server.kernel.model import ChangeKind, FieldViolation, Scope, ScopeKind, Subject
from prefd_server.kernel.paging import paginate
from prefd_server.kernel.privacy import pseudonym_of
from prefd_server.kernel.tokens import TokenKey
from prefd_server.kernel.watch import Compacted, Erased, Progress, Started, WatchTarget, watch
from prefd_server.preferences.cache import RedisLayers
from prefd_server.rpc import convert
from prefd_server.rpc.auth import Principal, current_call, current_principal, parse_request
from prefd_server.rpc.request_memo import RequestMemo

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

MAX_REQUEST_ID = 128
MAX_TOKENS_PER_CALL = 10**12
MAX_PRICE_USD_PER_1K = 1000.0
REQUEST_ID_PATTERN = re.compile(rf"[A-Za-z0-9._:@+/-]{{1,{MAX_REQUEST_ID}}}")
_PRIORITY = re.compile(r"-?(0|[1-9][0-9]{0,9})")
AI_WATCH_KINDS = frozenset({ChangeKind.AI_CONFIG, ChangeKind.BUDGET})
AI_WATCH_PREFIXES = ("ai_config/", "budget/")
# Mask paths below `configuration` and the flat paths each one covers.
_SECTION_PATHS = {s: [p for p in FIELD_TYPES if p.startswith(f"{s}.")] for s in SECTIONS}
_KEY_FIELDS = ("primary", "secondary")


def _check_config_id(value: str, field: str = "id") -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise invalid(field, "must be a config id (a UUID)") from exc


def _owner_scope(user_id: str, org_id: str, is_global: bool, field: str) -> Scope:
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


def _require_config_write(principal: Principal, scope: Scope) -> None:
    """A user writes its own USER configs; ORG and GLOBAL configs need admin; services write none."""
    if principal.is_admin:
        return
    principal.require_write(scope)


def _require_config_read(principal: Principal, scope: Scope) -> None:
    """Service and admin read any config; a user its own, its org's and the GLOBAL ones."""
    if principal.reads_any:
        return
    if scope.kind is ScopeKind.GLOBAL or scope == Scope(ScopeKind.USER, principal.subject):
        return
    if scope.kind is ScopeKind.ORG and principal.org and scope.id == principal.org:
        return
    raise PermissionDenied(f"{principal.subject} may not read AI configs of {scope}", action="read")


def _check_org(org_id: str) -> None:
    problem = id_problem(org_id)
    if problem:
        raise invalid("subject.org_id", problem)


def _chain_org(principal: Principal, scope: Scope) -> str:
    """The org a USER config is validated under: the writer's own org when it writes for itself."""
    if scope.kind is ScopeKind.USER and principal.subject == scope.id:
        return principal.org
    return ""


def _apply_mask(
    old: AIConfigRecord,
    request: ai_config_pb2.AIConfig,
    paths: list[str],
    values: dict[str, Any],
    keys: dict[str, str],
) -> tuple[AIConfigRecord, KeyUpdate | None]:
    """The stored config with the masked fields taken from the request (unset named fields cleared)."""
    new_values = dict(old.values)
    slots: dict[str, str] = {}
    name, priority, active = old.name, old.priority, old.active
    if not paths:  # AIP-134: every populated field
        name = request.name or name
        priority = request.priority or priority
        active = request.active or active
        new_values.update(values)
        slots.update(keys)
    for path in paths:
        if path == "name":
            name = request.name
        elif path == "priority":
            priority = request.priority
        elif path == "active":
            active = request.active
        elif path == "configuration":
            new_values = dict(values)
            slots = {slot: keys.get(slot, "") for slot in _KEY_FIELDS}
        else:
            covered = _mask_coverage(path)
            for flat in covered:
                if flat in FIELD_TYPES:
                    new_values.pop(flat, None)
                    if flat in values:
                        new_values[flat] = values[flat]
                else:
                    slots[flat.split(".")[1]] = keys.get(flat.split(".")[1], "")
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
        covered = _SECTION_PATHS[section] + ([f"api_keys.{s}" for s in _KEY_FIELDS] if section == "api_keys" else [])
        if len(parts) == 2:
            return covered
        flat = f"{section}.{parts[2]}"
        if flat in covered:
            return [flat]
    raise invalid("update_mask.paths", f"{path!r} cannot be updated")


def _parse_priority(text: str) -> int:
    """A config priority (int32) as this server wrote it in a page token."""
    if not _PRIORITY.fullmatch(text) or not -(2**31) <= int(text) < 2**31:
        raise invalid("page_token", "is malformed")
    return int(text)


class AIConfigService(ai_config_pb2_grpc.AIConfigServiceServicer):
    """Named AI configs, their resolution, the catalog, API keys, usage and budgets."""

    # Methods whose handler receives the serialized request (see Authenticator.add_service).
    RAW_REQUEST_METHODS = frozenset({"GetEffectiveAIConfig"})

    def __init__(
        self,
        writer: AIConfigStore,
        cache: AIConfigCache,
        feed: FeedReader,
        redis: RedisLayers | None,
        tokens: TokenKey,
        progress_interval_s: float,
        on_budget_commit: Callable[[int], None],
        pseudonym_key: str = "",
    ) -> None:
        self._pseudonym_key = pseudonym_key
        self._writer = writer
        self._cache = cache
        self._feed = feed
        self._redis = redis
        self._tokens = tokens
        self._progress_interval_s = progress_interval_s
        self._on_budget_commit = on_budget_commit
        self._counters_suspect: set[str] = set()  # users whose Redis mirror missed an update
        self._cursor_field = convert.CursorField(ai_config_pb2.GetEffectiveAIConfigResponse, tokens)
        self._parsed_reads: RequestMemo[tuple[str, str]] = RequestMemo()

    # --- named configs -----------------------------------------------------------------

    async def CreateAIConfig(
        self, request: ai_config_pb2.CreateAIConfigRequest, context: Context
    ) -> ai_config_pb2.CreateAIConfigResponse:
        principal = current_principal()
        config = request.config
        scope = _owner_scope(config.user_id, config.org_id, config.__getattribute__("global"), "config")
        _require_config_write(principal, scope)
        convert.check_reason(request.reason)
        values, keys, violations = ai_convert.configuration_from_pb(config.configuration, "config.configuration")
        problem = name_problem(config.name)
        if problem:
            violations.insert(0, FieldViolation("config.name", problem))
        violations += layer_violations(values, "config.configuration")
        if violations:
            raise ValidationFailed(violations)
        draft = AIConfigRecord("", scope, config.name, config.priority, config.active, values, None, 0)
        key_update = KeyUpdate(keys, new_primary=bool(keys.get("primary"))) if keys else None
        if keys and "primary" not in keys:
            raise invalid("config.configuration.api_keys.primary", "a secondary key needs a primary key")
        stored = await self._writer.create(
            draft, key_update, current_call(), request.reason, _chain_org(principal, scope)
        )
        return ai_config_pb2.CreateAIConfigResponse(config=await self._config_pb(stored, principal))

    async def UpdateAIConfig(
        self, request: ai_config_pb2.UpdateAIConfigRequest, context: Context
    ) -> ai_config_pb2.UpdateAIConfigResponse:
        principal = current_principal()
        config = request.config
        config_id = _check_config_id(config.id, "config.id")
        convert.check_reason(request.reason)
        paths = list(request.update_mask.paths)
        for path in paths:
            if path not in ("name", "priority", "active", "configuration"):
                _mask_coverage(path)
        if "name" in paths or (not paths and config.name):
            problem = name_problem(config.name)
            if problem:
                raise invalid("config.name", problem)
        values, keys, violations = ai_convert.configuration_from_pb(config.configuration, "config.configuration")
        violations += layer_violations(values, "config.configuration")
        if violations:
            raise ValidationFailed(violations)
        requested_owner = (config.user_id, config.org_id, config.__getattribute__("global"))

        def authorize(scope: Scope) -> None:
            if any(requested_owner) and _owner_scope(*requested_owner, "config") != scope:
                raise invalid("config", "the owner (user_id, org_id, global) of a config cannot change")

        def mutate(old: AIConfigRecord | None) -> tuple[AIConfigRecord | None, KeyUpdate | None]:
            assert old is not None
            return _apply_mask(old, config, paths, values, keys)

        stored = await self._change(config_id, request, mutate, authorize)
        assert stored is not None  # only a deletion gives None
        return ai_config_pb2.UpdateAIConfigResponse(config=await self._config_pb(stored, principal))

    async def GetAIConfig(
        self, request: ai_config_pb2.GetAIConfigRequest, context: Context
    ) -> ai_config_pb2.GetAIConfigResponse:
        principal = current_principal()
        record = await self._writer.get(_check_config_id(request.id))
        _require_config_read(principal, record.scope)
        return ai_config_pb2.GetAIConfigResponse(config=await self._config_pb(record, principal))

    async def ListAIConfigs(
        self, request: ai_config_pb2.ListAIConfigsRequest, context: Context
    ) -> ai_config_pb2.ListAIConfigsResponse:
        principal = current_principal()
        scope = _owner_scope(request.user_id, request.org_id, request.__getattribute__("global"), "request")
        _require_config_read(principal, scope)
        query = {"rpc": "ListAIConfigs", "kind": scope.kind.value, "id": scope.id}
        page = paginate(query, request.page_size, request.page_token, self._tokens)
        after = None
        if page.after is not None:
            priority, sep, name = page.after.partition(":")
            if not sep or not name:
                raise invalid("page_token", "is malformed")
            after = (_parse_priority(priority), name)
        found = await self._writer.page(scope, after, page.limit)
        configs, next_token = page.cut(found, lambda c: f"{c.priority}:{c.name}")
        return ai_config_pb2.ListAIConfigsResponse(
            configs=[await self._config_pb(r, principal) for r in configs], next_page_token=next_token
        )

    async def DeleteAIConfig(
        self, request: ai_config_pb2.DeleteAIConfigRequest, context: Context
    ) -> ai_config_pb2.DeleteAIConfigResponse:
        config_id = _check_config_id(request.id)
        convert.check_reason(request.reason)
        deleted_version = 0

        def mutate(old: AIConfigRecord | None) -> tuple[AIConfigRecord | None, KeyUpdate | None]:
            nonlocal deleted_version
            assert old is not None
            deleted_version = old.version + 1
            return None, None

        await self._change(config_id, request, mutate)
        return ai_config_pb2.DeleteAIConfigResponse(version=deleted_version)

    async def SetAIConfigActive(
        self, request: ai_config_pb2.SetAIConfigActiveRequest, context: Context
    ) -> ai_config_pb2.SetAIConfigActiveResponse:
        principal = current_principal()
        config_id = _check_config_id(request.id)
        convert.check_reason(request.reason)

        def mutate(old: AIConfigRecord | None) -> tuple[AIConfigRecord | None, KeyUpdate | None]:
            assert old is not None
            return replace(old, active=request.active), None

        stored = await self._change(config_id, request, mutate)
        assert stored is not None  # only a deletion gives None
        return ai_config_pb2.SetAIConfigActiveResponse(config=await self._config_pb(stored, principal))

    async def RotateAPIKey(
        self, request: ai_config_pb2.RotateAPIKeyRequest, context: Context
    ) -> ai_config_pb2.RotateAPIKeyResponse:
        principal = current_principal()
        config_id = _check_config_id(request.id)
        convert.check_reason(request.reason)
        problems = key_problems(request.new_key)
        if problems:
            raise ValidationFailed([FieldViolation("new_key", p) for p in problems])

        def mutate(old: AIConfigRecord | None) -> tuple[AIConfigRecord | None, KeyUpdate | None]:
            assert old is not None
            return old, KeyUpdate({"primary": request.new_key}, new_primary=True, rotate=True)

        stored = await self._change(config_id, request, mutate)
        assert stored is not None  # only a deletion gives None
        return ai_config_pb2.RotateAPIKeyResponse(config=await self._config_pb(stored, principal))

    async def _change(
        self,
        config_id: str,
        request: Any,
        mutate: Mutation,
        authorize: Callable[[Scope], None] | None = None,
    ) -> AIConfigRecord | None:
        """Apply `mutate` to a stored config the caller may write (`request`: its expected_version and reason).

        Returns the stored config, None when `mutate` deleted it."""
        principal = current_principal()

        def allowed(scope: Scope) -> None:
            _require_config_write(principal, scope)
            if authorize is not None:
                authorize(scope)

        expected = request.expected_version if request.HasField("expected_version") else None
        return await self._writer.change(
            config_id,
            expected,
            mutate,
            current_call(),
            request.reason,
            lambda scope: _chain_org(principal, scope),
            allowed,
        )

    async def _config_pb(self, record: AIConfigRecord, principal: Principal) -> ai_config_pb2.AIConfig:
        plaintext = None
        if principal.reads_secrets and record.keys is not None:
            plaintext = await self._cache.config_keys(record.id)
        return ai_convert.config_to_pb(record, plaintext)

    # --- effective configuration ---------------------------------------------------------

    def _subject(self, subject: common_pb2.Subject, principal: Principal) -> Subject:
        default_org = principal.org if principal.subject == subject.user_id else ""
        parsed = convert.subject_from_pb(subject, "subject", default_org)
        principal.require_read(parsed)
        return parsed

    async def GetEffectiveAIConfig(  # type: ignore[override]  # raw request bytes in, prebuilt body out
        self, request: bytes, context: Context
    ) -> bytes:
        principal = current_principal()
        # Hot path: request bytes seen before map to their validated subject without parsing.
        parsed = self._parsed_reads.get(request)
        if parsed is None:
            parsed = self._parse_read(request)
        user_id, requested_org = parsed
        org_id = requested_org or (principal.org if principal.subject == user_id else "")
        if not principal.may_read(user_id, org_id):
            principal.require_read(Subject(user_id, org_id))
        if org_id != requested_org:  # the org came from the token's claim, not the validated request
            _check_org(org_id)
        subject = Subject(user_id, org_id)
        privileged = principal.reads_secrets
        key = (subject.user_id, subject.org_id, privileged)
        position = self._feed.position
        body = self._cache.response(key)
        if body is not None:
            return body + self._cursor_field(position)
        resolved = await self._cache.resolve(subject)
        message = ai_config_pb2.GetEffectiveAIConfigResponse()
        await self._fill_effective(message, resolved, privileged)
        body = message.SerializeToString()
        self._cache.store_response(key, resolved, body)
        if self._cache.changed_since(resolved.scopes, resolved.since_tick):
            position = min(position, FeedCursor.at_horizon(resolved.xmin))
        return body + self._cursor_field(position)

    def _parse_read(self, raw: bytes) -> tuple[str, str]:
        """Parse and validate a GetEffectiveAIConfigRequest; remember the result by its bytes."""
        request = parse_request(raw, ai_config_pb2.GetEffectiveAIConfigRequest.FromString, "GetEffectiveAIConfig")
        subject = convert.subject_from_pb(request.subject, "subject")
        parsed = (subject.user_id, subject.org_id)
        self._parsed_reads.remember(raw, parsed, len(subject.user_id) + len(subject.org_id))
        return parsed

    async def _fill_effective(self, message: Any, resolved: Resolved, privileged: bool) -> None:
        effective = resolved.effective
        plaintext = await self._cache.plaintext_keys(effective) if privileged else None
        message.configuration.CopyFrom(ai_convert.configuration_to_pb(effective.values, effective.keys, plaintext))
        for path, source in ai_convert.provenance_to_pb(effective).items():
            message.provenance[path].CopyFrom(source)
        message.violations.extend(ai_convert.violation_to_pb(v) for v in effective.violations)

    # --- catalog -------------------------------------------------------------------------

    async def ListModels(
        self, request: ai_config_pb2.ListModelsRequest, context: Context
    ) -> ai_config_pb2.ListModelsResponse:
        catalog = await self._cache.catalog()
        return ai_config_pb2.ListModelsResponse(models=[ai_convert.model_to_pb(m) for _, m in sorted(catalog.items())])

    async def UpdateModel(
        self, request: ai_config_pb2.UpdateModelRequest, context: Context
    ) -> ai_config_pb2.UpdateModelResponse:
        current_principal().require_admin("UpdateModel")
        convert.check_reason(request.reason)
        model = _model_from_pb(request.model)
        stored = await self._writer.update_model(model, current_call(), request.reason)
        return ai_config_pb2.UpdateModelResponse(model=ai_convert.model_to_pb(stored))

    async def EstimateCost(
        self, request: ai_config_pb2.EstimateCostRequest, context: Context
    ) -> ai_config_pb2.EstimateCostResponse:
        model = await self._catalog_model(request.model, request.input_tokens, request.output_tokens)
        input_cost, output_cost = model.cost(request.input_tokens, request.output_tokens)
        total = input_cost + output_cost
        return ai_config_pb2.EstimateCostResponse(
            cost_usd=nanos_to_usd(total), cost_nanos=total, input_cost_nanos=input_cost, output_cost_nanos=output_cost
        )

    async def _catalog_model(self, model: str, input_tokens: int, output_tokens: int) -> ModelInfo:
        violations = [
            FieldViolation(field, f"must be between 0 and {MAX_TOKENS_PER_CALL} (got {count})")
            for field, count in (("input_tokens", input_tokens), ("output_tokens", output_tokens))
            if not 0 <= count <= MAX_TOKENS_PER_CALL
        ]
        catalog = await self._cache.catalog()
        info = catalog.get(model)
        if info is None:
            violations.insert(0, FieldViolation("model", f"model {model!r} is not in the catalog"))
        if violations:
            raise ValidationFailed(violations)
        assert info is not None
        return info

    # --- usage and budgets ---------------------------------------------------------------

    async def RecordUsage(
        self, request: ai_config_pb2.RecordUsageRequest, context: Context
    ) -> ai_config_pb2.RecordUsageResponse:
        principal = current_principal()
        principal.require_service("RecordUsage")
        subject = convert.subject_from_pb(request.subject, "subject")
        if not REQUEST_ID_PATTERN.fullmatch(request.request_id):
            raise invalid("request_id", f"must be 1-{MAX_REQUEST_ID} characters of [A-Za-z0-9._:@+/-]")
        await self._catalog_model(request.model, request.input_tokens, request.output_tokens)
        effective = (await self._cache.resolve(subject)).effective
        budgets = effective.budgets_nanos
        thresholds = effective.values["cost_budget.alert_thresholds"]
        record, xid = await ai_usage.record(
            self._writer.pool,
            subject,
            request.model,
            request.input_tokens,
            request.output_tokens,
            request.request_id,
            budgets,
            thresholds,
            current_call(),
        )
        if xid is not None:
            self._on_budget_commit(xid)
        if record.recorded and self._redis is not None:
            counters = {_counter(subject.user_id, p, start): total for p, (start, total) in record.totals.items()}
            if not await self._redis.raise_counters(counters, COUNTER_TTL_S):
                self._counters_suspect.add(subject.user_id)
        return ai_config_pb2.RecordUsageResponse(
            cost_nanos=record.cost_nanos,
            cost_usd=nanos_to_usd(record.cost_nanos),
            recorded=record.recorded,
            record_time=convert.timestamp(record.recorded_at),
            crossed=[ai_convert.crossing_to_pb(c) for c in record.crossings],
        )

    async def GetBudgetStatus(
        self, request: ai_config_pb2.GetBudgetStatusRequest, context: Context
    ) -> ai_config_pb2.GetBudgetStatusResponse:
        principal = current_principal()
        subject = self._subject(request.subject, principal)
        effective = (await self._cache.resolve(subject)).effective
        starts = ai_usage.period_starts(datetime.now(UTC))
        spent = await self._spent(subject.user_id, starts)
        thresholds = effective.values["cost_budget.alert_thresholds"]
        periods = []
        for period, start in starts.items():
            budget = effective.budgets_nanos[period]
            periods.append(
                ai_config_pb2.BudgetPeriodStatus(
                    period=ai_convert.PERIOD_PB[period],
                    period_start=convert.timestamp(ai_convert.day_start(start)),
                    spent_usd=nanos_to_usd(spent[period]),
                    spent_nanos=spent[period],
                    budget_usd=nanos_to_usd(budget),
                    thresholds_crossed=[t for t in thresholds if budget > 0 and reached(spent[period], budget, t)],
                    exceeded=spent[period] >= budget,
                )
            )
        return ai_config_pb2.GetBudgetStatusResponse(periods=periods)

    async def _spent(self, user_id: str, starts: Mapping[str, Any]) -> dict[str, int]:
        """Spend per period: Redis counters when they are all there and trusted, else the ledger totals."""
        names = {period: _counter(user_id, period, start) for period, start in starts.items()}
        if self._redis is not None and user_id not in self._counters_suspect:
            found = await self._redis.counters(list(names.values()))
            if found is not None and len(found) == len(names):
                return {period: found[name] for period, name in names.items()}
        totals = await ai_usage.totals(self._writer.pool, user_id, dict(starts))
        if self._redis is not None and await self._redis.raise_counters(
            {names[p]: total for p, total in totals.items()}, COUNTER_TTL_S
        ):
            self._counters_suspect.discard(user_id)
        return totals

    # --- watch ---------------------------------------------------------------------------

    async def WatchAIConfig(
        self, request: ai_config_pb2.WatchAIConfigRequest, context: Context
    ) -> AsyncIterator[ai_config_pb2.WatchAIConfigResponse]:
        principal = current_principal()
        subject = self._subject(request.subject, principal)
        start = None
        if request.HasField("start_cursor"):
            try:
                start = FeedCursor.decode(request.start_cursor.token, self._tokens)
            except ValueError as exc:
                raise invalid("start_cursor", str(exc)) from exc
        target = WatchTarget.for_subject(subject, AI_WATCH_PREFIXES, pseudonym_of(self._pseudonym_key, subject.user_id))
        async for item in watch(
            self._feed,
            self._writer.pool,
            target,
            start,
            self._progress_interval_s,
            self._tokens,
            kinds=AI_WATCH_KINDS,
        ):
            if isinstance(item, Started):
                yield ai_config_pb2.WatchAIConfigResponse(
                    started=common_pb2.WatchStarted(cursor=self._encode(item.cursor))
                )
            elif isinstance(item, Progress):
                yield ai_config_pb2.WatchAIConfigResponse(
                    progress=common_pb2.WatchProgress(cursor=self._encode(item.cursor))
                )
            elif isinstance(item, Compacted):
                yield ai_config_pb2.WatchAIConfigResponse(
                    compacted=common_pb2.WatchCompacted(oldest_cursor=self._encode(item.oldest))
                )
            elif isinstance(item, Erased):
                yield ai_config_pb2.WatchAIConfigResponse(
                    erased=common_pb2.WatchErased(cursor=self._encode(item.position))
                )
            else:
                yield await self._watch_change(item.event, subject, principal.reads_secrets)

    async def _watch_change(
        self, event: ChangeEvent, subject: Subject, privileged: bool
    ) -> ai_config_pb2.WatchAIConfigResponse:
        cursor = self._encode(event.position)
        if event.kind == ChangeKind.BUDGET:
            crossing = ai_convert.crossing_from_document(event.scope.id, event.new_value or {})
            return ai_config_pb2.WatchAIConfigResponse(
                budget=ai_config_pb2.BudgetEvent(crossed=ai_convert.crossing_to_pb(crossing), cursor=cursor)
            )
        doc = event.new_value or event.old_value or {}
        changed = ai_config_pb2.AIConfigChanged(
            config_id=event.key.removeprefix("ai_config/"),
            config_name=str(doc.get("name", "")),
            scope=convert.scope_to_pb(event.scope),
            version=event.version,
            cursor=cursor,
        )
        await self._fill_effective(changed, await self._cache.resolve(subject), privileged)
        return ai_config_pb2.WatchAIConfigResponse(config_changed=changed)

    def _encode(self, cursor: FeedCursor) -> common_pb2.Cursor:
        return convert.cursor_to_pb(cursor, self._tokens)


# Budget counters outlive their period by a day (a month is at most 31 days).
COUNTER_TTL_S = 32 * 86400


def _counter(user_id: str, period: str, start: Any) -> str:
    return f"usage:{user_id}:{period}:{start}"


def _model_from_pb(message: ai_config_pb2.AIModel) -> ModelInfo:
    """A validated catalog model."""
    violations = []
    if not MODEL_ID_PATTERN.fullmatch(message.model):
        violations.append(FieldViolation("model.model", "must be 1-128 letters, digits, '.', '_', ':' or '-'"))
    if message.context_window < 1:
        violations.append(FieldViolation("model.context_window", "must be at least 1"))
    if not 1 <= message.output_limit <= max(message.context_window, 1):
        violations.append(FieldViolation("model.output_limit", "must be between 1 and context_window"))
    for field in ("input_usd_per_1k", "output_usd_per_1k"):
        price = getattr(message, field)
        if not (math.isfinite(price) and 0 <= price <= MAX_PRICE_USD_PER_1K):
            violations.append(FieldViolation(f"model.{field}", f"must be between 0 and {MAX_PRICE_USD_PER_1K}"))
    if len(message.features) > 32:
        violations.append(FieldViolation("model.features", "at most 32 features"))
    violations += [
        FieldViolation(f"model.features[{i}]", "must be 1-64 characters")
        for i, feature in enumerate(message.features)
        if not 1 <= len(feature) <= 64
    ]
    if violations:
        raise ValidationFailed(violations)
    return ModelInfo(
        model=message.model,
        context_window=message.context_window,
        output_limit=message.output_limit,
        input_nanos_per_1k=usd_to_nanos(message.input_usd_per_1k),
        output_nanos_per_1k=usd_to_nanos(message.output_usd_per_1k),
        features=tuple(message.features),
    )
