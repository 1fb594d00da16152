"""prefd.v1.PreferencesService."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf import field_mask_pb2

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.errors import ValidationFailed, invalid
from prefd_server.kernel.feed import FeedReader
from prefd_server.kernel.ids import id_problem, key_problem
from prefd_server.kernel.model import MAX_KEY_LENGTH, FieldViolation, ScopeKind, Subject
from prefd_server.kernel.paging import paginate
from prefd_server.kernel.privacy import pseudonym_of
from prefd_server.kernel.tokens import TokenKey
from prefd_server.kernel.watch import Compacted, Erased, Progress, Started, WatchItem, WatchTarget, watch
from prefd_server.preferences.cache import EffectiveCache
from prefd_server.preferences.model import MAX_BATCH_SUBJECTS, MAX_WRITES_PER_CALL, KeyWrite, WriteResult
from prefd_server.preferences.reads import PreferenceReader
from prefd_server.preferences.rules import definition_violations
from prefd_server.preferences.writes import PreferenceWriter
from prefd_server.rpc import convert
from prefd_server.rpc.auth import current_call, current_principal, parse_request
from prefd_server.rpc.request_memo import RequestMemo

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

# Definition fields an update_mask may name.
MUTABLE_DEFINITION_FIELDS = (
    "category",
    "description",
    "type",
    "default_value",
    "allowed_values",
    "min_value",
    "max_value",
    "max_length",
    "overridable_scopes",
    "sensitive",
)


def _check_key(key: str, field: str) -> None:
    problem = key_problem(key)
    if problem:
        raise invalid(field, problem)


def _check_id(value: str, field: str) -> None:
    problem = id_problem(value)
    if problem:
        raise invalid(field, problem)


def _check_filters(key_prefixes: Sequence[str], categories: Sequence[str]) -> None:
    violations = [
        FieldViolation(f"key_prefixes[{i}]", f"must be at most {MAX_KEY_LENGTH} characters")
        for i, prefix in enumerate(key_prefixes)
        if len(prefix) > MAX_KEY_LENGTH
    ]
    violations += [
        FieldViolation(f"categories[{i}]", "must be 1-64 characters")
        for i, category in enumerate(categories)
        if not category or len(category) > 64
    ]
    if violations:
        raise ValidationFailed(violations)


def _check_key_list(keys: Sequence[str], field: str) -> None:
    if not keys:
        raise invalid(field, "name at least one key")
    if len(keys) > MAX_WRITES_PER_CALL:
        raise invalid(field, f"at most {MAX_WRITES_PER_CALL} keys per call (got {len(keys)})")
    seen: set[str] = set()
    violations = []
    for i, key in enumerate(keys):
        problem = key_problem(key)
        if problem:
            violations.append(FieldViolation(f"{field}[{i}]", problem))
        elif key in seen:
            violations.append(FieldViolation(f"{field}[{i}]", f"{key} appears more than once"))
        seen.add(key)
    if violations:
        raise ValidationFailed(violations)


def _changes(result: WriteResult) -> list[Any]:
    return [convert.change_to_pb(c) for c in result.changes]


class PreferencesService(preferences_pb2_grpc.PreferencesServiceServicer):
    """Definitions, stored overrides and effective values."""

    # Methods whose handler receives the serialized request (see Authenticator.add_service).
    RAW_REQUEST_METHODS = frozenset({"GetEffectivePreferences"})

    def __init__(
        self,
        reader: PreferenceReader,
        writer: PreferenceWriter,
        cache: EffectiveCache,
        feed: FeedReader,
        tokens: TokenKey,
        progress_interval_s: float,
        pseudonym_key: str = "",
    ) -> None:
        self._pseudonym_key = pseudonym_key
        self._reader = reader
        self._writer = writer
        self._cache = cache
        self._feed = feed
        self._tokens = tokens
        self._progress_interval_s = progress_interval_s
        self._cursor_field = convert.CursorField(preferences_pb2.GetEffectivePreferencesResponse, tokens)
        self._parsed_reads: RequestMemo[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = RequestMemo()

    async def CreateDefinition(
        self, request: preferences_pb2.CreateDefinitionRequest, context: Context
    ) -> preferences_pb2.CreateDefinitionResponse:
        current_principal().require_admin("CreateDefinition")
        definition = convert.definition_from_pb(request.definition)
        violations = definition_violations(definition)
        if violations:
            raise ValidationFailed(violations)
        stored = await self._writer.create_definition(definition, current_call())
        return preferences_pb2.CreateDefinitionResponse(definition=convert.definition_to_pb(stored))

    async def UpdateDefinition(
        self, request: preferences_pb2.UpdateDefinitionRequest, context: Context
    ) -> preferences_pb2.UpdateDefinitionResponse:
        current_principal().require_admin("UpdateDefinition")
        _check_key(request.definition.key, "definition.key")
        paths = list(request.update_mask.paths) or list(MUTABLE_DEFINITION_FIELDS)
        unknown = [p for p in paths if p not in MUTABLE_DEFINITION_FIELDS]
        if unknown:
            raise ValidationFailed([FieldViolation("update_mask.paths", f"{p!r} cannot be updated") for p in unknown])
        merged = convert.definition_to_pb(await self._reader.definition(request.definition.key))
        mask = field_mask_pb2.FieldMask(paths=paths)
        mask.MergeMessage(request.definition, merged, replace_message_field=True, replace_repeated_field=True)
        definition = convert.definition_from_pb(merged)
        violations = definition_violations(definition)
        if violations:
            raise ValidationFailed(violations)
        expected = request.expected_version if request.HasField("expected_version") else None
        stored = await self._writer.update_definition(definition, expected, current_call())
        return preferences_pb2.UpdateDefinitionResponse(definition=convert.definition_to_pb(stored))

    async def GetDefinition(
        self, request: preferences_pb2.GetDefinitionRequest, context: Context
    ) -> preferences_pb2.GetDefinitionResponse:
        _check_key(request.key, "key")
        definition = await self._reader.definition(request.key)
        return preferences_pb2.GetDefinitionResponse(definition=convert.definition_to_pb(definition))

    async def ListDefinitions(
        self, request: preferences_pb2.ListDefinitionsRequest, context: Context
    ) -> preferences_pb2.ListDefinitionsResponse:
        query = {"rpc": "ListDefinitions", "category": request.category}
        page = paginate(query, request.page_size, request.page_token, self._tokens)
        found = await self._reader.definitions_page(request.category, page.after, page.limit)
        definitions, next_token = page.cut(found, lambda d: d.key)
        return preferences_pb2.ListDefinitionsResponse(
            definitions=[convert.definition_to_pb(d) for d in definitions], next_page_token=next_token
        )

    async def DeleteDefinition(
        self, request: preferences_pb2.DeleteDefinitionRequest, context: Context
    ) -> preferences_pb2.DeleteDefinitionResponse:
        current_principal().require_admin("DeleteDefinition")
        _check_key(request.key, "key")
        convert.check_reason(request.reason)
        removed = await self._writer.delete_definition(request.key, request.force, current_call(), request.reason)
        return preferences_pb2.DeleteDefinitionResponse(removed_overrides=removed)

    async def SetPreferences(
        self, request: preferences_pb2.SetPreferencesRequest, context: Context
    ) -> preferences_pb2.SetPreferencesResponse:
        scope = convert.scope_from_pb(request.scope)
        principal = current_principal()
        principal.require_write(scope)
        convert.check_reason(request.reason)
        _check_key_list([w.key for w in request.writes], "writes")
        writes = [
            KeyWrite(
                w.key,
                convert.value_from_pb(w.value, f"writes[{i}].value"),
                w.expected_version if w.HasField("expected_version") else None,
            )
            for i, w in enumerate(request.writes)
        ]
        org_id = self._write_org(request.org_id, scope.kind, principal.org, principal.is_admin)
        result = await self._writer.write(
            scope, writes, current_call(), reason=request.reason, dry_run=request.dry_run, org_id=org_id
        )
        return preferences_pb2.SetPreferencesResponse(
            changes=[convert.change_to_pb(c) for c in result.changes],
            effective_values=convert.effective_to_pb(result.effective),
            dry_run=result.dry_run,
        )

    @staticmethod
    def _write_org(requested: str, kind: ScopeKind, caller_org: str, is_admin: bool) -> str:
        """The org layer under a USER write: the request's (admin) or the caller's own."""
        if kind is not ScopeKind.USER:
            if requested:
                raise invalid("org_id", "applies only to USER scope writes")
            return ""
        if requested and not is_admin and requested != caller_org:
            raise invalid("org_id", "must be your own org")
        org = requested or caller_org
        if org:
            _check_id(org, "org_id")
        return org

    async def DeletePreferences(
        self, request: preferences_pb2.DeletePreferencesRequest, context: Context
    ) -> preferences_pb2.DeletePreferencesResponse:
        scope = convert.scope_from_pb(request.scope)
        principal = current_principal()
        principal.require_write(scope)
        convert.check_reason(request.reason)
        _check_key_list(list(request.keys), "keys")
        org_id = principal.org if scope.kind is ScopeKind.USER else ""
        result = await self._writer.write(
            scope,
            [KeyWrite(k, None) for k in request.keys],
            current_call(),
            reason=request.reason,
            org_id=org_id,
            field="keys",
        )
        return preferences_pb2.DeletePreferencesResponse(changes=_changes(result))

    async def ResetPreferences(
        self, request: preferences_pb2.ResetPreferencesRequest, context: Context
    ) -> preferences_pb2.ResetPreferencesResponse:
        scope = convert.scope_from_pb(request.scope)
        current_principal().require_write(scope)
        convert.check_reason(request.reason)
        if request.category:
            _check_filters((), [request.category])
        result = await self._writer.reset(scope, request.category, current_call(), request.reason)
        return preferences_pb2.ResetPreferencesResponse(changes=_changes(result))

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
            preferences=[convert.stored_to_pb(v) for v in stored],
            next_page_token=next_token,
            cursor=convert.cursor_to_pb(cursor, self._tokens),
        )

    async def GetEffectivePreferences(  # type: ignore[override]  # raw request bytes in, prebuilt body out
        self, request: bytes, context: Context
    ) -> bytes:
        principal = current_principal()
        # Hot path: request bytes seen before map to their validated (subject, filter) without
        # parsing; the prebuilt body for it is followed by the current cursor. Only the permission
        # check runs per call. The feed position is safe for cached data: the cache drops anything
        # a passed change touched.
        parsed = self._parsed_reads.get(request)
        if parsed is None:
            parsed = self._parse_read(request)
        user_id, requested_org, prefixes, categories = parsed
        org_id = requested_org or (principal.org if principal.subject == user_id else "")
        if not principal.may_read(user_id, org_id):
            principal.require_read(Subject(user_id, org_id))
        key = (user_id, org_id, prefixes, categories)
        body = self._cache.response(key)
        if body is None:
            subject = Subject(user_id, org_id)
            if org_id != requested_org:  # the org came from the token's claim, not the validated request
                _check_id(org_id, "subject.org_id")
            since = self._cache.tick
            values, used = await self._cache.resolve_subject(subject, prefixes, categories)
            body = preferences_pb2.GetEffectivePreferencesResponse(
                values=convert.effective_to_pb(values), nested=convert.nested_to_pb(values)
            ).SerializeToString()
            self._cache.store_response(key, used, since, body)
        return body + self._cursor_field(self._feed.position)

    def _parse_read(self, raw: bytes) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
        """Parse and validate a GetEffectivePreferencesRequest; remember the result by its bytes."""
        request = parse_request(
            raw, preferences_pb2.GetEffectivePreferencesRequest.FromString, "GetEffectivePreferences"
        )
        subject = convert.subject_from_pb(request.subject, "subject")
        _check_filters(request.key_prefixes, request.categories)
        parsed = (subject.user_id, subject.org_id, tuple(request.key_prefixes), tuple(request.categories))
        self._parsed_reads.remember(raw, parsed, len(raw))
        return parsed

    async def BatchGetEffectivePreferences(
        self, request: preferences_pb2.BatchGetEffectivePreferencesRequest, context: Context
    ) -> preferences_pb2.BatchGetEffectivePreferencesResponse:
        principal = current_principal()
        if not request.subjects:
            raise invalid("subjects", "name at least one subject")
        if len(request.subjects) > MAX_BATCH_SUBJECTS:
            raise invalid("subjects", f"at most {MAX_BATCH_SUBJECTS} subjects per call (got {len(request.subjects)})")
        subjects = [convert.subject_from_pb(s, f"subjects[{i}]") for i, s in enumerate(request.subjects)]
        for subject in subjects:
            principal.require_read(subject)
        _check_filters(request.key_prefixes, request.categories)
        cursor = self._feed.position
        results = await self._cache.resolve(subjects, request.key_prefixes, request.categories)
        return preferences_pb2.BatchGetEffectivePreferencesResponse(
            results=[
                preferences_pb2.SubjectPreferences(
                    subject=convert.subject_to_pb(subject),
                    values=convert.effective_to_pb(values),
                    nested=convert.nested_to_pb(values),
                )
                for subject, values in zip(subjects, results, strict=True)
            ],
            cursor=convert.cursor_to_pb(cursor, self._tokens),
        )

    async def WatchPreferences(
        self, request: preferences_pb2.WatchPreferencesRequest, context: Context
    ) -> AsyncIterator[preferences_pb2.WatchPreferencesResponse]:
        principal = current_principal()
        _check_filters(request.key_prefixes, ())
        if request.HasField("subject"):
            default_org = principal.org if principal.subject == request.subject.user_id else ""
            subject = convert.subject_from_pb(request.subject, "subject", default_org)
            principal.require_read(subject)
            target = WatchTarget.for_subject(
                subject, request.key_prefixes, pseudonym_of(self._pseudonym_key, subject.user_id)
            )
        elif request.HasField("scope"):
            scope = convert.scope_from_pb(request.scope)
            principal.require_read_scope(scope)
            target = WatchTarget.for_scope(scope, request.key_prefixes)
        else:
            raise invalid("target", "set subject or scope")
        start = None
        if request.HasField("start_cursor"):
            try:
                start = FeedCursor.decode(request.start_cursor.token, self._tokens)
            except ValueError as exc:
                raise invalid("start_cursor", str(exc)) from exc
        async for item in watch(self._feed, self._reader.pool, target, start, self._progress_interval_s, self._tokens):
            yield await self._watch_message(item, target)

    async def _watch_message(self, item: WatchItem, target: WatchTarget) -> preferences_pb2.WatchPreferencesResponse:
        cursor = self._encode
        if isinstance(item, Started):
            return preferences_pb2.WatchPreferencesResponse(started=common_pb2.WatchStarted(cursor=cursor(item.cursor)))
        if isinstance(item, Progress):
            return preferences_pb2.WatchPreferencesResponse(
                progress=common_pb2.WatchProgress(cursor=cursor(item.cursor))
            )
        if isinstance(item, Compacted):
            return preferences_pb2.WatchPreferencesResponse(
                compacted=common_pb2.WatchCompacted(oldest_cursor=cursor(item.oldest))
            )
        if isinstance(item, Erased):
            return preferences_pb2.WatchPreferencesResponse(erased=common_pb2.WatchErased(cursor=cursor(item.position)))
        event = item.event
        change = convert.change_event_to_pb(event, cursor(event.position))
        if target.subject is not None:
            resolved = await self._cache.resolve_key(target.subject, event.key)
            if resolved is not None:
                change.effective.CopyFrom(convert.effective_to_pb([resolved])[0])
        return preferences_pb2.WatchPreferencesResponse(change=change)

    def _encode(self, cursor: FeedCursor) -> common_pb2.Cursor:
        return convert.cursor_to_pb(cursor, self._tokens)
