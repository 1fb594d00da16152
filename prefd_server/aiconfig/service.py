"""prefd.v1.AIConfigService: named AI configs, their resolution, the catalog, API keys, usage and budgets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from prefd.v1 import ai_config_pb2, ai_config_pb2_grpc, common_pb2
from prefd_server.aiconfig import convert as ai_convert
from prefd_server.aiconfig.cache import AIConfigCache, Resolved
from prefd_server.aiconfig.model import AIConfigRecord, ModelInfo, Mutation
from prefd_server.aiconfig.rules import (
    Deletion,
    activation,
    catalog_model,
    chain_org,
    check_config_id,
    check_new_config,
    check_new_key,
    check_owner_unchanged,
    check_request_id,
    check_update,
    masked_update,
    owner_scope,
    page_after,
    page_key,
    require_config_read,
    require_config_write,
    rotation,
)
from prefd_server.aiconfig.usage import UsageLedger
from prefd_server.aiconfig.writes import AIConfigStore
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import ChangeKind, Scope, Subject
from prefd_server.kernel.paging import paginate
from prefd_server.kernel.parts import Kernel
from prefd_server.kernel.privacy import pseudonym_of
from prefd_server.kernel.watch import WatchTarget
from prefd_server.rpc import convert
from prefd_server.rpc.effective_read import EffectiveRead
from prefd_server.rpc.principal import Principal, current_call, current_principal
from prefd_server.rpc.request_memo import RequestMemo
from prefd_server.rpc.watch_stream import start_cursor, watch_responses

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

AI_WATCH_KINDS = frozenset({ChangeKind.AI_CONFIG, ChangeKind.BUDGET})
AI_WATCH_PREFIXES = ("ai_config/", "budget/")
# A prebuilt GetEffectiveAIConfig body's key: (user_id, org_id, keys in clear).
EffectiveKey: TypeAlias = tuple[str, str, bool]


class AIConfigService(ai_config_pb2_grpc.AIConfigServiceServicer):
    """Named AI configs, their resolution, the catalog, API keys, usage and budgets."""

    # Methods whose handler receives the serialized request (see Authenticator.add_service).
    SERVICE_NAME: str = ai_config_pb2.DESCRIPTOR.services_by_name["AIConfigService"].full_name
    add_to_server = staticmethod(ai_config_pb2_grpc.add_AIConfigServiceServicer_to_server)
    RAW_REQUEST_METHODS = frozenset({"GetEffectiveAIConfig"})

    def __init__(
        self,
        kernel: Kernel,
        writer: AIConfigStore,
        cache: AIConfigCache,
        progress_interval_s: float,
    ) -> None:
        self._pseudonym_key = kernel.pseudonym_key
        self._writer = writer
        self._cache = cache
        self._feed = feed = kernel.feed
        self._usage = UsageLedger(writer, kernel.redis, kernel.commits.feed_appended)
        self._tokens = tokens = kernel.tokens
        self._progress_interval_s = progress_interval_s
        self._effective_read: EffectiveRead[None, EffectiveKey, Resolved] = EffectiveRead(
            method="GetEffectiveAIConfig",
            request_type=ai_config_pb2.GetEffectiveAIConfigRequest,
            response_type=ai_config_pb2.GetEffectiveAIConfigResponse,
            parse=_parse_effective_read,
            key=_effective_key,
            response=cache.response,
            build=self._effective_body,
            store_response=cache.store_response,
            feed=feed,
            tokens=tokens,
            parsed=RequestMemo("ai_config.requests", kernel.caches),
            ceiling=self._effective_ceiling,
        )

    # --- named configs -----------------------------------------------------------------

    async def CreateAIConfig(
        self, request: ai_config_pb2.CreateAIConfigRequest, context: Context
    ) -> ai_config_pb2.CreateAIConfigResponse:
        principal = current_principal()
        config = request.config
        scope = owner_scope(*ai_convert.owner_from_pb(config), "config")
        require_config_write(principal, scope)
        convert.check_reason(request.reason)
        values, keys, violations = ai_convert.configuration_from_pb(config.configuration, "config.configuration")
        key_update = check_new_config(config.name, values, keys, violations)
        draft = AIConfigRecord("", scope, config.name, config.priority, config.active, values, None, 0)
        stored = await self._writer.create(
            draft, key_update, current_call(), request.reason, chain_org(principal, scope)
        )
        return ai_config_pb2.CreateAIConfigResponse(config=await self._config_pb(stored, principal))

    async def UpdateAIConfig(
        self, request: ai_config_pb2.UpdateAIConfigRequest, context: Context
    ) -> ai_config_pb2.UpdateAIConfigResponse:
        config = request.config
        config_id = check_config_id(config.id, "config.id")
        convert.check_reason(request.reason)
        paths = list(request.update_mask.paths)
        values, keys, violations = ai_convert.configuration_from_pb(config.configuration, "config.configuration")
        check_update(paths, config.name, values, violations)
        owner = ai_convert.owner_from_pb(config)
        mutate = masked_update(ai_convert.config_fields_from_pb(config), paths, values, keys)
        changed = await self._changed_pb(config_id, request, mutate, lambda scope: check_owner_unchanged(owner, scope))
        return ai_config_pb2.UpdateAIConfigResponse(config=changed)

    async def GetAIConfig(
        self, request: ai_config_pb2.GetAIConfigRequest, context: Context
    ) -> ai_config_pb2.GetAIConfigResponse:
        principal = current_principal()
        record = await self._writer.get(check_config_id(request.id))
        require_config_read(principal, record.scope)
        return ai_config_pb2.GetAIConfigResponse(config=await self._config_pb(record, principal))

    async def ListAIConfigs(
        self, request: ai_config_pb2.ListAIConfigsRequest, context: Context
    ) -> ai_config_pb2.ListAIConfigsResponse:
        principal = current_principal()
        scope = owner_scope(request.user_id, request.org_id, request.__getattribute__("global"), "request")
        require_config_read(principal, scope)
        query = {"rpc": "ListAIConfigs", "kind": scope.kind.value, "id": scope.id}
        page = paginate(query, request.page_size, request.page_token, self._tokens)
        found = await self._writer.page(scope, page_after(page.after), page.limit)
        configs, next_token = page.cut(found, page_key)
        return ai_config_pb2.ListAIConfigsResponse(
            configs=[await self._config_pb(r, principal) for r in configs], next_page_token=next_token
        )

    async def DeleteAIConfig(
        self, request: ai_config_pb2.DeleteAIConfigRequest, context: Context
    ) -> ai_config_pb2.DeleteAIConfigResponse:
        config_id = check_config_id(request.id)
        convert.check_reason(request.reason)
        deletion = Deletion()
        await self._change(config_id, request, deletion)
        return ai_config_pb2.DeleteAIConfigResponse(version=deletion.version)

    async def SetAIConfigActive(
        self, request: ai_config_pb2.SetAIConfigActiveRequest, context: Context
    ) -> ai_config_pb2.SetAIConfigActiveResponse:
        config_id = check_config_id(request.id)
        convert.check_reason(request.reason)
        changed = await self._changed_pb(config_id, request, activation(request.active))
        return ai_config_pb2.SetAIConfigActiveResponse(config=changed)

    async def RotateAPIKey(
        self, request: ai_config_pb2.RotateAPIKeyRequest, context: Context
    ) -> ai_config_pb2.RotateAPIKeyResponse:
        config_id = check_config_id(request.id)
        convert.check_reason(request.reason)
        check_new_key(request.new_key)
        changed = await self._changed_pb(config_id, request, rotation(request.new_key))
        return ai_config_pb2.RotateAPIKeyResponse(config=changed)

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
            require_config_write(principal, scope)
            if authorize is not None:
                authorize(scope)

        expected = request.expected_version if request.HasField("expected_version") else None
        return await self._writer.change(
            config_id,
            expected,
            mutate,
            current_call(),
            request.reason,
            lambda scope: chain_org(principal, scope),
            allowed,
        )

    async def _changed_pb(
        self,
        config_id: str,
        request: Any,
        mutate: Mutation,
        authorize: Callable[[Scope], None] | None = None,
    ) -> ai_config_pb2.AIConfig:
        """The config after `_change` applied a mutation that keeps it, as the caller may see it."""
        stored = await self._change(config_id, request, mutate, authorize)
        assert stored is not None  # only a deletion gives None
        return await self._config_pb(stored, current_principal())

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

    def GetEffectiveAIConfig(  # type: ignore[override]  # raw request bytes in, prebuilt body out
        self, request: bytes, context: Context
    ) -> Awaitable[bytes]:
        # Not a coroutine of its own: the shared read's coroutine is the call's only one.
        return self._effective_read(request)

    async def _effective_body(self, subject: Subject, _rest: None, key: EffectiveKey) -> tuple[bytes, Resolved]:
        """A GetEffectiveAIConfigResponse body (no cursor) for the subject, keys in clear for `key`'s privileged."""
        resolved = await self._cache.resolve(subject)
        message = ai_config_pb2.GetEffectiveAIConfigResponse()
        await self._fill_effective(message, resolved, privileged=key[2])
        return message.SerializeToString(), resolved

    def _effective_ceiling(self, resolved: Resolved) -> FeedCursor | None:
        """A body built while one of its scopes changed is as of its snapshot horizon, not the feed's position."""
        if self._cache.changed_since(resolved.scopes, resolved.since_tick):
            return FeedCursor.at_horizon(resolved.xmin)
        return None

    async def _fill_effective(self, message: Any, resolved: Resolved, privileged: bool) -> None:
        effective = resolved.effective
        plaintext = await self._cache.plaintext_keys(effective) if privileged else None
        ai_convert.fill_effective(message, effective, plaintext)

    # --- catalog -------------------------------------------------------------------------

    async def ListModels(
        self, request: ai_config_pb2.ListModelsRequest, context: Context
    ) -> ai_config_pb2.ListModelsResponse:
        catalog = await self._cache.catalog()
        return ai_config_pb2.ListModelsResponse(models=[ai_convert.model_to_pb(m) for _, m in sorted(catalog.items())])

    async def UpdateModel(
        self, request: ai_config_pb2.UpdateModelRequest, context: Context
    ) -> ai_config_pb2.UpdateModelResponse:
        convert.check_reason(request.reason)
        model = ai_convert.model_from_pb(request.model)
        stored = await self._writer.update_model(model, current_call(), request.reason)
        return ai_config_pb2.UpdateModelResponse(model=ai_convert.model_to_pb(stored))

    async def EstimateCost(
        self, request: ai_config_pb2.EstimateCostRequest, context: Context
    ) -> ai_config_pb2.EstimateCostResponse:
        model = await self._catalog_model(request.model, request.input_tokens, request.output_tokens)
        return ai_convert.estimate_to_pb(*model.cost(request.input_tokens, request.output_tokens))

    async def _catalog_model(self, model: str, input_tokens: int, output_tokens: int) -> ModelInfo:
        return catalog_model(await self._cache.catalog(), model, input_tokens, output_tokens)

    # --- usage and budgets ---------------------------------------------------------------

    async def RecordUsage(
        self, request: ai_config_pb2.RecordUsageRequest, context: Context
    ) -> ai_config_pb2.RecordUsageResponse:
        generation = ai_convert.generation_from_pb(request)
        check_request_id(generation.request_id)
        await self._catalog_model(generation.model, generation.input_tokens, generation.output_tokens)
        effective = (await self._cache.resolve(generation.subject)).effective
        record = await self._usage.record(generation, effective, current_call())
        return ai_convert.usage_to_pb(record)

    async def GetBudgetStatus(
        self, request: ai_config_pb2.GetBudgetStatusRequest, context: Context
    ) -> ai_config_pb2.GetBudgetStatusResponse:
        subject = self._subject(request.subject, current_principal())
        effective = (await self._cache.resolve(subject)).effective
        return ai_convert.budget_status_to_pb(await self._usage.status(subject.user_id, effective))

    # --- watch ---------------------------------------------------------------------------

    def WatchAIConfig(
        self, request: ai_config_pb2.WatchAIConfigRequest, context: Context
    ) -> AsyncIterator[ai_config_pb2.WatchAIConfigResponse]:
        principal = current_principal()
        subject = self._subject(request.subject, principal)
        start = start_cursor(request, self._tokens)
        target = WatchTarget.for_subject(subject, AI_WATCH_PREFIXES, pseudonym_of(self._pseudonym_key, subject.user_id))
        items = self._writer.watch(self._feed, target, start, self._progress_interval_s, self._tokens, AI_WATCH_KINDS)

        async def change(event: ChangeEvent, cursor: common_pb2.Cursor) -> ai_config_pb2.WatchAIConfigResponse:
            return await self._watch_change(event, cursor, subject, principal.reads_secrets)

        return watch_responses(items, ai_config_pb2.WatchAIConfigResponse, self._tokens, change)

    async def _watch_change(
        self, event: ChangeEvent, cursor: common_pb2.Cursor, subject: Subject, privileged: bool
    ) -> ai_config_pb2.WatchAIConfigResponse:
        if event.kind == ChangeKind.BUDGET:
            return ai_convert.budget_event_to_pb(event, cursor)
        changed = ai_convert.config_changed_to_pb(event, cursor)
        await self._fill_effective(changed, await self._cache.resolve(subject), privileged)
        return ai_config_pb2.WatchAIConfigResponse(config_changed=changed)


def _parse_effective_read(request: ai_config_pb2.GetEffectiveAIConfigRequest) -> tuple[str, str, None]:
    """A GetEffectiveAIConfigRequest's (user_id, org_id as requested, nothing more)."""
    subject = convert.subject_from_pb(request.subject, "subject")
    return subject.user_id, subject.org_id, None


def _effective_key(user_id: str, org_id: str, _rest: None, principal: Principal) -> EffectiveKey:
    """Responses differ by subject and by whether the caller sees keys in clear."""
    return user_id, org_id, principal.reads_secrets
