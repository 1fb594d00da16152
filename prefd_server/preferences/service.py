"""prefd.v1.PreferencesService: definitions, stored overrides, effective values and their watch."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Hashable
from typing import Any, TypeAlias

import grpc

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.kernel.errors import invalid
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import ResolvedValue, Scope, Subject
from prefd_server.kernel.paging import paginate
from prefd_server.kernel.parts import Kernel
from prefd_server.kernel.privacy import pseudonym_of
from prefd_server.kernel.watch import WatchTarget, watch
from prefd_server.preferences import convert as preference_convert
from prefd_server.preferences.cache import EffectiveCache
from prefd_server.preferences.effective_convert import (
    OwnBody,
    batch_body,
    effective_body,
    effective_kept,
    subject_preferences,
)
from prefd_server.preferences.model import MAX_BATCH_SUBJECTS
from prefd_server.preferences.reads import PreferenceReader
from prefd_server.preferences.rules import check_filters, check_key
from prefd_server.preferences.writes import PreferenceWriter
from prefd_server.rpc import convert
from prefd_server.rpc.convert import CursorField
from prefd_server.rpc.effective_read import EffectiveRead, ParsedRead
from prefd_server.rpc.principal import Principal, current_call, current_principal
from prefd_server.rpc.request_memo import RequestMemo
from prefd_server.rpc.watch_stream import start_cursor, watch_responses

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

# The filters of an effective read: (key prefixes, categories).
Filters: TypeAlias = tuple[tuple[str, ...], tuple[str, ...]]
# The cache key of an effective read: (user_id, org_id, filters).
EffectiveKey: TypeAlias = tuple[str, str, Filters]
# What a body was built from: the horizon (xmin) of each layer it read, and the cache tick before.
# The layers a body was built from (scope -> xmin), the cache tick before, what to keep of it (the org
# base's body, or the subject's parts over it) with its own size, and the subject's org.
BuiltFrom: TypeAlias = tuple[dict[Scope, int], int, bytes | OwnBody, int, str]


def _parse_effective_read(request: preferences_pb2.GetEffectivePreferencesRequest) -> ParsedRead[Filters]:
    """A GetEffectivePreferencesRequest's validated subject and filters."""
    subject = convert.subject_from_pb(request.subject, "subject")
    check_filters(request.key_prefixes, request.categories)
    return subject.user_id, subject.org_id, (tuple(request.key_prefixes), tuple(request.categories))


class PreferencesService(preferences_pb2_grpc.PreferencesServiceServicer):
    """Definitions, stored overrides and effective values."""

    # Methods whose handler receives the serialized request (see Authenticator.add_service).
    SERVICE_NAME: str = preferences_pb2.DESCRIPTOR.services_by_name["PreferencesService"].full_name
    add_to_server = staticmethod(preferences_pb2_grpc.add_PreferencesServiceServicer_to_server)
    RAW_REQUEST_METHODS = frozenset({"GetEffectivePreferences"})

    def __init__(
        self,
        kernel: Kernel,
        reader: PreferenceReader,
        writer: PreferenceWriter,
        cache: EffectiveCache,
        progress_interval_s: float,
    ) -> None:
        self._pseudonym_key = kernel.pseudonym_key
        self._reader = reader
        self._writer = writer
        self._cache = cache
        self._feed = feed = kernel.feed
        self._tokens = tokens = kernel.tokens
        self._progress_interval_s = progress_interval_s
        self._effective_read: EffectiveRead[Filters, EffectiveKey, BuiltFrom] = EffectiveRead(
            method="GetEffectivePreferences",
            request_type=preferences_pb2.GetEffectivePreferencesRequest,
            response_type=preferences_pb2.GetEffectivePreferencesResponse,
            parse=_parse_effective_read,
            response=cache.response,
            build=self._build_effective,
            store_response=self._store_effective,
            feed=feed,
            tokens=tokens,
            parsed=RequestMemo("preferences.requests", kernel.caches),
        )
        self._batch_cursor = CursorField(preferences_pb2.BatchGetEffectivePreferencesResponse, tokens)

    async def CreateDefinition(
        self, request: preferences_pb2.CreateDefinitionRequest, context: Context
    ) -> preferences_pb2.CreateDefinitionResponse:
        definition = preference_convert.valid_definition_from_pb(request.definition)
        stored = await self._writer.create_definition(definition, current_call())
        return preferences_pb2.CreateDefinitionResponse(definition=preference_convert.definition_to_pb(stored))

    async def UpdateDefinition(
        self, request: preferences_pb2.UpdateDefinitionRequest, context: Context
    ) -> preferences_pb2.UpdateDefinitionResponse:
        key = check_key(request.definition.key, "definition.key")
        paths = preference_convert.update_paths(request)
        definition = preference_convert.updated_definition(request, paths, await self._reader.definition(key))
        expected = request.expected_version if request.HasField("expected_version") else None
        stored = await self._writer.update_definition(definition, expected, current_call())
        return preferences_pb2.UpdateDefinitionResponse(definition=preference_convert.definition_to_pb(stored))

    async def GetDefinition(
        self, request: preferences_pb2.GetDefinitionRequest, context: Context
    ) -> preferences_pb2.GetDefinitionResponse:
        definition = await self._reader.definition(check_key(request.key, "key"))
        return preferences_pb2.GetDefinitionResponse(definition=preference_convert.definition_to_pb(definition))

    async def ListDefinitions(
        self, request: preferences_pb2.ListDefinitionsRequest, context: Context
    ) -> preferences_pb2.ListDefinitionsResponse:
        query = {"rpc": "ListDefinitions", "category": request.category}
        page = paginate(query, request.page_size, request.page_token, self._tokens)
        found = await self._reader.definitions_page(request.category, page.after, page.limit)
        definitions, next_token = page.cut(found, lambda d: d.key)
        return preferences_pb2.ListDefinitionsResponse(
            definitions=[preference_convert.definition_to_pb(d) for d in definitions], next_page_token=next_token
        )

    async def DeleteDefinition(
        self, request: preferences_pb2.DeleteDefinitionRequest, context: Context
    ) -> preferences_pb2.DeleteDefinitionResponse:
        key = check_key(request.key, "key")
        convert.check_reason(request.reason)
        removed = await self._writer.delete_definition(key, request.force, current_call(), request.reason)
        return preferences_pb2.DeleteDefinitionResponse(removed_overrides=removed)

    async def SetPreferences(
        self, request: preferences_pb2.SetPreferencesRequest, context: Context
    ) -> preferences_pb2.SetPreferencesResponse:
        principal = current_principal()
        scope = convert.scope_from_pb(request.scope)
        principal.require_write(scope)
        command = preference_convert.set_request_to_write(request, scope, principal.org, principal.is_admin)
        result = await self._writer.write(command, current_call())
        return preference_convert.set_response_to_pb(result)

    async def DeletePreferences(
        self, request: preferences_pb2.DeletePreferencesRequest, context: Context
    ) -> preferences_pb2.DeletePreferencesResponse:
        principal = current_principal()
        scope = convert.scope_from_pb(request.scope)
        principal.require_write(scope)
        command = preference_convert.delete_request_to_write(request, scope, principal.org)
        result = await self._writer.write(command, current_call())
        return preferences_pb2.DeletePreferencesResponse(changes=preference_convert.changes_to_pb(result))

    async def ResetPreferences(
        self, request: preferences_pb2.ResetPreferencesRequest, context: Context
    ) -> preferences_pb2.ResetPreferencesResponse:
        scope = convert.scope_from_pb(request.scope)
        current_principal().require_write(scope)
        convert.check_reason(request.reason)
        if request.category:
            check_filters((), [request.category])
        result = await self._writer.reset(scope, request.category, current_call(), request.reason)
        return preferences_pb2.ResetPreferencesResponse(changes=preference_convert.changes_to_pb(result))

    async def ListPreferences(
        self, request: preferences_pb2.ListPreferencesRequest, context: Context
    ) -> preferences_pb2.ListPreferencesResponse:
        scope = convert.scope_from_pb(request.scope)
        current_principal().require_read_scope(scope)
        query = {"rpc": "ListPreferences", "kind": scope.kind.value, "id": scope.id}
        page = paginate(query, request.page_size, request.page_token, self._tokens)
        found, cursor = await self._reader.overrides_page(scope, page.after, page.limit)
        stored, next_token = page.cut(found, lambda v: v.key)
        return preferences_pb2.ListPreferencesResponse(
            preferences=[preference_convert.stored_to_pb(v) for v in stored],
            next_page_token=next_token,
            cursor=convert.cursor_to_pb(cursor, self._tokens),
        )

    def GetEffectivePreferences(  # type: ignore[override]  # raw request bytes in, prebuilt body out
        self, request: bytes, context: Context
    ) -> Awaitable[bytes]:
        # Not a coroutine of its own: the shared read's coroutine is the call's only one.
        return self._effective_read(request)

    async def _build_effective(self, subject: Subject, filters: Filters, key: EffectiveKey) -> tuple[bytes, BuiltFrom]:
        """A GetEffectivePreferencesResponse body (without cursor) and the layers it was built from."""
        since = self._cache.tick
        (found,) = await self._cache.subject_values([subject], *filters)
        kept, size = effective_kept(found)
        return effective_body(kept), (found.used, since, kept, size, subject.org_id)

    def _store_effective(self, key: EffectiveKey, built_from: BuiltFrom, body: bytes) -> None:
        used, since, kept, size, org_id = built_from
        self._cache.store_response(key, used, since, kept, size, org_id)

    async def BatchGetEffectivePreferences(  # type: ignore[override]  # a serialized response out
        self, request: preferences_pb2.BatchGetEffectivePreferencesRequest, context: Context
    ) -> bytes:
        principal = current_principal()
        if not request.subjects:
            raise invalid("subjects", "name at least one subject")
        if len(request.subjects) > MAX_BATCH_SUBJECTS:
            raise invalid("subjects", f"at most {MAX_BATCH_SUBJECTS} subjects per call (got {len(request.subjects)})")
        subjects = [convert.subject_from_pb(s, f"subjects[{i}]") for i, s in enumerate(request.subjects)]
        for subject in subjects:
            principal.require_read(subject)
        check_filters(request.key_prefixes, request.categories)
        cursor = self._feed.position
        found = await self._cache.subject_values(subjects, request.key_prefixes, request.categories)
        results = [subject_preferences(s, values) for s, values in zip(subjects, found, strict=True)]
        return batch_body(results, self._batch_cursor(cursor))

    def WatchPreferences(  # type: ignore[override]  # changes go out as shared serialized bytes
        self, request: preferences_pb2.WatchPreferencesRequest, context: Context
    ) -> AsyncIterator[preferences_pb2.WatchPreferencesResponse | bytes]:
        target = self._watch_target(request, current_principal())
        start = start_cursor(request, self._tokens)
        items = watch(self._feed, self._reader.pool, target, start, self._progress_interval_s, self._tokens)

        async def change(event: ChangeEvent, cursor: common_pb2.Cursor) -> bytes:
            return await self._watch_change(event, cursor, target.subject)

        return watch_responses(items, preferences_pb2.WatchPreferencesResponse, self._tokens, change)

    def _watch_target(self, request: preferences_pb2.WatchPreferencesRequest, principal: Principal) -> WatchTarget:
        """What a watch follows (a subject's scopes, or one scope) once the caller may read it."""
        check_filters(request.key_prefixes, ())
        if request.HasField("subject"):
            default_org = principal.org if principal.subject == request.subject.user_id else ""
            subject = convert.subject_from_pb(request.subject, "subject", default_org)
            principal.require_read(subject)
            pseudonym = pseudonym_of(self._pseudonym_key, subject.user_id)
            return WatchTarget.for_subject(subject, request.key_prefixes, pseudonym)
        if request.HasField("scope"):
            scope = convert.scope_from_pb(request.scope)
            principal.require_read_scope(scope)
            return WatchTarget.for_scope(scope, request.key_prefixes)
        raise invalid("target", "set subject or scope")

    async def _watch_change(self, event: ChangeEvent, cursor: common_pb2.Cursor, subject: Subject | None) -> bytes:
        """A change as its serialized WatchPreferencesResponse, with the watched subject's effective value of
        its key. Watchers whose value came from the same stored row (or default) and rollout bucket get the
        same message: it is built and serialized once per event."""
        resolved = await self._cache.resolve_key(subject, event.key, event.shared) if subject is not None else None
        # The event's memo is shared with other domains' watchers: this domain's entries carry its name.
        same = ("WatchPreferences", None if resolved is None else _same_value(resolved))
        body: bytes | None = event.shared.get(same)
        if body is None:
            change = preference_convert.change_event_to_pb(event, cursor)
            if resolved is not None:
                change.effective.CopyFrom(convert.effective_to_pb([resolved])[0])
            body = event.shared[same] = preferences_pb2.WatchPreferencesResponse(change=change).SerializeToString()
        return body


def _same_value(resolved: ResolvedValue) -> Hashable:
    """What makes two subjects' effective values (and their provenance) of one key the same."""
    return (
        resolved.layer,
        resolved.scope,
        resolved.version,
        resolved.updated_at,
        resolved.updated_by,
        resolved.rollout,
        resolved.shadowed,
    )
