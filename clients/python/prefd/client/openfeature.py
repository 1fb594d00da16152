"""An OpenFeature provider answered from prefd's live views, in memory.

    from openfeature import api
    from openfeature.evaluation_context import EvaluationContext
    from prefd.client.openfeature import PrefdProvider

    api.set_provider_and_wait(PrefdProvider("localhost:50051", token=os.environ["PREFD_TOKEN"]))
    flags = api.get_client()
    alice = EvaluationContext(targeting_key="alice", attributes={"org": "acme"})
    await flags.get_boolean_value_async("notifications.email.enabled", False, alice)

Install it with the `openfeature` extra (`prefd-client[openfeature]`). A flag is a prefd key; the
evaluation context's `targeting_key` is the user id and its `org` attribute the org id. The provider
keeps one live view (snapshot, then watch) per subject, opened on the subject's first evaluation and
closed when `max_views` newer subjects have been evaluated since its last one.

A subject's first evaluation: the async methods (`get_*_async`) wait for its view's snapshot (bounded
by `timeout_s`); the blocking ones never wait: they start the view and answer the default value with
error code PROVIDER_NOT_READY until it is open. `warm(user_id, org_id)` / `await warm_async(...)` open
a subject's view ahead of its first evaluation. An evaluation context with a `targeting_key` given to
`initialize` (the SDK's global context) is warmed by `initialize`.

Reasons come from provenance: DEFAULT (the definition's default), STATIC (a GLOBAL value),
TARGETING_MATCH (an ORG or USER value), SPLIT (a rollout's variant, named in `variant`), STALE (the
view has had no healthy stream for `grace_s`: its last values are served). `flag_metadata` carries the
value's layer, scope, version, updated_by and updated_at, and the view's cursor.

Events: PROVIDER_READY once started (and again after a recovery), PROVIDER_CONFIGURATION_CHANGED with
the changed keys (`flags_changed`) and the subject (`metadata`), PROVIDER_STALE while a view is stale,
PROVIDER_ERROR when the server cannot be reached or refuses the token. A refused token at `initialize`
is PROVIDER_FATAL; a subject the token may not read answers GENERAL (the subject's own error, not the
provider's); an invalid subject answers INVALID_CONTEXT.

The provider runs its views, their channel and its health check on an event loop thread of its own,
so it serves threaded and asyncio code alike; an evaluation of a subject whose view is open does no
I/O and never waits on that loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEventDetails
from openfeature.exception import (
    ErrorCode,
    GeneralError,
    InvalidContextError,
    OpenFeatureError,
    ProviderFatalError,
)
from openfeature.flag_evaluation import FlagResolutionDetails, FlagValueType, Reason
from openfeature.provider import AbstractProvider, Metadata

from prefd.client.channel import AsyncPrefdClient, TLSConfig, TokenProvider
from prefd.client.errors import PrefdError
from prefd.client.views import Backoff, KeyChange, PreferencesView
from prefd.v1 import common_pb2, preferences_pb2

__all__ = ["PrefdProvider"]

log = logging.getLogger(__name__)
T = TypeVar("T")
ObjectValue = Sequence[FlagValueType] | Mapping[str, FlagValueType]

# Refusals that concern one subject, not the server or the token: that subject's evaluations answer
# them, the provider stays READY for every other subject.
_SUBJECT_ERRORS = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT})
# A view that is stale because the server refuses its token or subject puts the provider in ERROR.
_REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
_REASONS = {
    common_pb2.LAYER_DEFAULT: Reason.DEFAULT,
    common_pb2.LAYER_GLOBAL: Reason.STATIC,
    common_pb2.LAYER_ORG: Reason.TARGETING_MATCH,
    common_pb2.LAYER_USER: Reason.TARGETING_MATCH,
}
_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class _FlagType:
    """The Python types a resolve method accepts (a bool is no number here) and how it hands a value
    out: a float evaluation widens an int, as prefd widens an int written to a double; an object
    evaluation hands out a copy, so that changing the answer cannot change the view."""

    name: str
    types: tuple[type, ...]
    convert: Callable[[Any], Any] | None = None

    def accepts(self, value: Any) -> bool:
        return isinstance(value, self.types) and (bool in self.types or not isinstance(value, bool))


_BOOLEAN = _FlagType("bool", (bool,))
_INTEGER = _FlagType("int", (int,))
_FLOAT = _FlagType("float", (int, float), float)
_STRING = _FlagType("string", (str,))
_OBJECT = _FlagType("object (a JSON object or a string list)", (dict, list), copy.deepcopy)
_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "string", list: "string list", dict: "JSON object"}


def _scope_name(scope: common_pb2.Scope) -> str:
    if scope.kind == common_pb2.SCOPE_KIND_UNSPECIFIED:
        return ""
    kind = common_pb2.ScopeKind.Name(scope.kind).removeprefix("SCOPE_KIND_")
    return f"{kind}:{scope.id}" if scope.id else kind


@dataclass(frozen=True, slots=True)
class _Provenance:
    """What an answer takes from a value's provenance, worked out once per provenance message (the
    view replaces the message when the value changes, never edits it)."""

    source: common_pb2.Provenance
    reason: Reason
    variant: str | None
    metadata: dict[str, str | int]  # everything but the cursor, which moves without the value

    @classmethod
    def of(cls, source: common_pb2.Provenance) -> _Provenance:
        variant = source.rollout.variant if source.HasField("rollout") else ""
        reason = Reason.SPLIT if variant else _REASONS.get(source.layer, Reason.UNKNOWN)
        metadata: dict[str, str | int] = {
            "layer": common_pb2.Layer.Name(source.layer).removeprefix("LAYER_"),
            "scope": _scope_name(source.scope),
            "version": source.version,
            "updated_by": source.updated_by,
        }
        if source.HasField("updated_at"):
            metadata["updated_at"] = source.updated_at.ToJsonString()
        return cls(source, reason, variant or None, metadata)


def _error(default: T, code: ErrorCode, message: str) -> FlagResolutionDetails[T]:
    """The default value with an error, as the OpenFeature specification asks of a failed resolution."""
    return FlagResolutionDetails(value=default, error_code=code, error_message=message, reason=Reason.ERROR)


def _openfeature_error(error: PrefdError) -> OpenFeatureError:
    """A prefd error as the OpenFeature error `initialize` and `warm` raise."""
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        return ProviderFatalError(f"prefd refused the token: {error}")
    if error.code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidContextError(f"prefd refused the subject: {error}")
    return GeneralError(str(error))


def _error_code(error: PrefdError) -> ErrorCode:
    """The error code of an evaluation whose subject's view could not be opened."""
    return ErrorCode.INVALID_CONTEXT if error.code == grpc.StatusCode.INVALID_ARGUMENT else ErrorCode.GENERAL


class _Subject:
    """One subject's view: opening (`view` and `error` None), open (`view`), or failed (`error`)."""

    __slots__ = ("error", "failed_at", "key", "opened", "provenance", "view")

    def __init__(self, key: tuple[str, str]) -> None:
        self.key = key
        self.view: PreferencesView | None = None
        self.error: PrefdError | None = None
        self.failed_at = 0.0
        self.opened: concurrent.futures.Future[None] | None = None
        # Per key evaluated: its provenance as answers carry it (at most the view's keys).
        self.provenance: dict[str, _Provenance] = {}


class _LoopThread:
    """An event loop on a thread of its own, with the provider's AsyncPrefdClient on it (grpc.aio binds
    a channel to the loop it is created on)."""

    def __init__(self, make_client: Callable[[], AsyncPrefdClient]) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="prefd-openfeature", daemon=True)
        self._thread.start()

        async def make() -> AsyncPrefdClient:
            return make_client()

        self.client = self.run(make())

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and wait for it (never from the loop's own thread)."""
        return self.submit(coroutine).result()

    def stop(self) -> None:
        self.run(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class PrefdProvider(AbstractProvider):
    """OpenFeature flags from prefd: each evaluation is answered from the subject's live view.

    `target` and `token` (a string or a callable returning the current one), `timeout_s`, `tls`,
    `credentials` and `options` are AsyncPrefdClient's. `max_views`: how many subjects' views stay open
    (least recently evaluated closed first). `key_prefixes`: the keys each view holds (all when empty;
    other keys answer FLAG_NOT_FOUND). `grace_s` / `backoff`: when a view with no healthy stream is
    stale, and how it reconnects. `retry_failed_s`: how long a subject whose view could not be opened
    answers that error before its next evaluation tries again. `health_check_s`: how often views are
    checked for staleness and recovery.
    """

    def __init__(
        self,
        target: str,
        token: str | TokenProvider,
        *,
        max_views: int = 1024,
        key_prefixes: Sequence[str] = (),
        timeout_s: float = 5.0,
        grace_s: float = 5.0,
        backoff: Backoff | None = None,
        retry_failed_s: float = 1.0,
        health_check_s: float = 0.25,
        tls: TLSConfig | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__()
        if isinstance(max_views, bool) or not isinstance(max_views, int) or max_views < 1:
            raise ValueError(f"max_views must be an int of at least 1, not {max_views!r}")
        for name, seconds in (
            ("timeout_s", timeout_s),
            ("grace_s", grace_s),
            ("retry_failed_s", retry_failed_s),
            ("health_check_s", health_check_s),
        ):
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < 86_400:
                raise ValueError(f"{name} must be a number of seconds above 0 and below a day, not {seconds!r}")
        if isinstance(key_prefixes, str):
            raise ValueError("key_prefixes is a sequence of prefixes, not one string")
        if tls is not None and credentials is not None:
            raise ValueError("pass either tls or credentials, not both")
        self._target = target
        self._token = token
        self._max_views = max_views
        self._key_prefixes = list(key_prefixes)
        self._timeout_s = float(timeout_s)
        self._grace_s = float(grace_s)
        self._backoff = backoff or Backoff()
        self._retry_failed_s = float(retry_failed_s)
        self._health_check_s = float(health_check_s)
        self._tls = tls
        self._credentials = credentials
        self._options = list(options)
        # Guards _subjects (evaluations on any thread, opening and eviction on the loop) and _runtime.
        self._lock = threading.Lock()
        self._subjects: OrderedDict[tuple[str, str], _Subject] = OrderedDict()
        self._runtime: _LoopThread | None = None
        self._monitor: asyncio.Task[None] | None = None
        # Tasks on the provider's loop: views being opened, evicted views being closed.
        self._opening: set[asyncio.Task[Any]] = set()
        self._closing: set[asyncio.Task[None]] = set()
        # The state last announced by an event ("ready", "stale" or "error"), and the last failure to
        # reach the server or to be accepted by it (cleared by the next view that opens).
        self._announced = "ready"
        self._server_error: PrefdError | None = None

    # --- OpenFeature provider -----------------------------------------------------------------

    def get_metadata(self) -> Metadata:
        return Metadata(name="prefd")

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        """Start the provider's loop and channel and check that the server accepts the token (a cheap
        catalog read). Raises ProviderFatalError for a refused token, GeneralError for an unreachable
        server, within `timeout_s`; the provider then answers evaluations as usual (each new subject
        tries again). When the context has a `targeting_key`, that subject's view is opened too; a
        refusal of that subject alone is answered by its evaluations, as for any other subject."""
        runtime = self._start()
        try:
            runtime.run(self._check_server(runtime.client))
        except PrefdError as error:
            self._server_error = error
            self._announced = "error"
            raise _openfeature_error(error) from error
        self._server_error = None
        self._announced = "ready"
        user_id, org_id, refused = self._subject_of(evaluation_context)
        if refused is None:
            with contextlib.suppress(OpenFeatureError):  # the subject's own error: its evaluations answer it
                self.warm(user_id, org_id)

    def shutdown(self) -> None:
        """Close every view and the channel and stop the provider's loop; `initialize` starts it again."""
        with self._lock:
            runtime, self._runtime = self._runtime, None
            subjects = list(self._subjects.values())
            self._subjects.clear()
        if runtime is not None:
            runtime.run(self._close_all(subjects))
            runtime.stop()

    def resolve_boolean_details(
        self, flag_key: str, default_value: bool, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[bool]:
        return self._resolve(flag_key, default_value, evaluation_context, _BOOLEAN)

    def resolve_string_details(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[str]:
        return self._resolve(flag_key, default_value, evaluation_context, _STRING)

    def resolve_integer_details(
        self, flag_key: str, default_value: int, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[int]:
        return self._resolve(flag_key, default_value, evaluation_context, _INTEGER)

    def resolve_float_details(
        self, flag_key: str, default_value: float, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[float]:
        return self._resolve(flag_key, default_value, evaluation_context, _FLOAT)

    def resolve_object_details(
        self, flag_key: str, default_value: ObjectValue, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[ObjectValue]:
        return self._resolve(flag_key, default_value, evaluation_context, _OBJECT)

    async def resolve_boolean_details_async(
        self, flag_key: str, default_value: bool, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[bool]:
        return await self._resolve_async(flag_key, default_value, evaluation_context, _BOOLEAN)

    async def resolve_string_details_async(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[str]:
        return await self._resolve_async(flag_key, default_value, evaluation_context, _STRING)

    async def resolve_integer_details_async(
        self, flag_key: str, default_value: int, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[int]:
        return await self._resolve_async(flag_key, default_value, evaluation_context, _INTEGER)

    async def resolve_float_details_async(
        self, flag_key: str, default_value: float, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[float]:
        return await self._resolve_async(flag_key, default_value, evaluation_context, _FLOAT)

    async def resolve_object_details_async(
        self, flag_key: str, default_value: ObjectValue, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[ObjectValue]:
        return await self._resolve_async(flag_key, default_value, evaluation_context, _OBJECT)

    # --- subjects ------------------------------------------------------------------------------

    @property
    def subjects(self) -> list[tuple[str, str]]:
        """The (user id, org id) of every subject whose view is held, least recently evaluated first."""
        with self._lock:
            return list(self._subjects)

    def warm(self, user_id: str, org_id: str = "") -> None:
        """Open a subject's view now, waiting for its snapshot (blocks the calling thread, within the
        view's deadlines; a coroutine awaits `warm_async` instead). Raises the OpenFeature error the
        subject's evaluations would carry (GeneralError, InvalidContextError, ProviderFatalError)."""
        subject = self._subject(user_id, org_id)
        if subject.opened is not None:
            with contextlib.suppress(Exception):
                subject.opened.result()
        self._raise_for(subject)

    async def warm_async(self, user_id: str, org_id: str = "") -> None:
        """Open a subject's view now and wait for its snapshot. Raises as `warm` does."""
        subject = self._subject(user_id, org_id)
        await self._wait_open(subject)
        self._raise_for(subject)

    # --- evaluation ----------------------------------------------------------------------------

    def _resolve(
        self, flag_key: str, default: Any, context: EvaluationContext | None, kind: _FlagType
    ) -> FlagResolutionDetails[Any]:
        user_id, org_id, refused = self._subject_of(context)
        if refused is not None:
            return _error(default, *refused)
        if self._runtime is None:
            return _error(default, ErrorCode.PROVIDER_NOT_READY, "the provider is not initialized")
        return self._answer(self._subject(user_id, org_id), flag_key, default, kind)

    async def _resolve_async(
        self, flag_key: str, default: Any, context: EvaluationContext | None, kind: _FlagType
    ) -> FlagResolutionDetails[Any]:
        user_id, org_id, refused = self._subject_of(context)
        if refused is not None:
            return _error(default, *refused)
        if self._runtime is None:
            return _error(default, ErrorCode.PROVIDER_NOT_READY, "the provider is not initialized")
        subject = self._subject(user_id, org_id)
        if subject.view is None and subject.error is None:
            await self._wait_open(subject)
        return self._answer(subject, flag_key, default, kind)

    @staticmethod
    def _subject_of(context: EvaluationContext | None) -> tuple[str, str, tuple[ErrorCode, str] | None]:
        if context is None or not context.targeting_key:
            missing = (ErrorCode.TARGETING_KEY_MISSING, "the evaluation context has no targeting_key (the user id)")
            return "", "", missing
        org_id = context.attributes.get("org", "")
        if not isinstance(org_id, str):
            wrong = (ErrorCode.INVALID_CONTEXT, f"the org attribute must be a string, not {type(org_id).__name__}")
            return "", "", wrong
        return context.targeting_key, org_id, None

    @staticmethod
    def _answer(subject: _Subject, flag_key: str, default: Any, kind: _FlagType) -> FlagResolutionDetails[Any]:
        view = subject.view
        if view is None:
            error = subject.error
            if error is not None:
                return _error(default, _error_code(error), str(error))
            return _error(default, ErrorCode.PROVIDER_NOT_READY, "the subject's view is opening; evaluate again")
        value = view.get(flag_key, _MISSING)
        if value is _MISSING:
            return _error(default, ErrorCode.FLAG_NOT_FOUND, f"prefd has no key {flag_key!r}")
        if not kind.accepts(value):
            message = f"{flag_key!r} is a {_TYPE_NAMES.get(type(value), type(value).__name__)}, not a {kind.name}"
            return _error(default, ErrorCode.TYPE_MISMATCH, message)
        if kind.convert is not None:
            value = kind.convert(value)
        source = view.provenance(flag_key)
        if source is None:  # a key the view holds always has its provenance
            return FlagResolutionDetails(value=value, reason=Reason.UNKNOWN)
        known = subject.provenance.get(flag_key)
        if known is None or known.source is not source:
            known = subject.provenance[flag_key] = _Provenance.of(source)
        return FlagResolutionDetails(
            value=value,
            reason=Reason.STALE if view.stale else known.reason,
            variant=known.variant,
            flag_metadata={**known.metadata, "cursor": view.cursor},
        )

    # --- views ---------------------------------------------------------------------------------

    def _subject(self, user_id: str, org_id: str) -> _Subject:
        """The subject's entry, marked most recently used; a new subject's view starts opening (and
        the least recently used beyond `max_views` close); a failed one is tried again after
        `retry_failed_s`."""
        key = (user_id, org_id)
        with self._lock:
            runtime = self._runtime
            if runtime is None:
                raise GeneralError("the provider is not initialized")
            subject = self._subjects.get(key)
            if subject is not None:
                self._subjects.move_to_end(key)
                if subject.error is None or time.monotonic() - subject.failed_at < self._retry_failed_s:
                    return subject
                subject.error = None
            else:
                subject = _Subject(key)
                self._subjects[key] = subject
                evicted = [self._subjects.popitem(last=False)[1] for _ in range(len(self._subjects) - self._max_views)]
                if evicted:
                    runtime.loop.call_soon_threadsafe(self._close_evicted, evicted)
            subject.opened = runtime.submit(self._open(subject, runtime.client))
            return subject

    @staticmethod
    def _raise_for(subject: _Subject) -> None:
        if subject.error is not None:
            raise _openfeature_error(subject.error)
        if subject.view is None:
            raise GeneralError("the provider was shut down while the subject's view was opening")

    @staticmethod
    async def _wait_open(subject: _Subject) -> None:
        """Wait for the subject's view to open or fail (bounded by the view's own deadlines)."""
        opened = subject.opened
        if opened is None:
            return
        try:
            # Shielded: a caller that gives up does not cancel the opening other callers wait for.
            await asyncio.shield(asyncio.wrap_future(opened))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except Exception:
            pass  # the subject's error answers

    async def _open(self, subject: _Subject, client: AsyncPrefdClient) -> None:
        user_id, org_id = subject.key
        view = PreferencesView(
            client._unary,
            client._stream,
            common_pb2.Subject(user_id=user_id, org_id=org_id),
            self._key_prefixes,
            grace_s=self._grace_s,
            raise_when_stale=False,
            backoff=self._backoff,
            open_timeout_s=self._timeout_s,
        )
        view.on_change(lambda changes: self._changed(subject, view, changes))
        task = asyncio.current_task()
        if task is not None:
            self._opening.add(task)
        try:
            await view.start()
        except asyncio.CancelledError:
            subject.error = PrefdError(grpc.StatusCode.CANCELLED, "the provider shut down while the view was opening")
            raise
        except Exception as exc:
            error = exc if isinstance(exc, PrefdError) else PrefdError(grpc.StatusCode.UNKNOWN, repr(exc))
            subject.error, subject.failed_at = error, time.monotonic()
            if error.code not in _SUBJECT_ERRORS:
                self._server_error = error
                self._announce()
            raise
        finally:
            if task is not None:
                self._opening.discard(task)
        subject.view = view
        with self._lock:
            held = self._subjects.get(subject.key) is subject
        if not held:  # evicted while opening: the waiting evaluations answer from its snapshot
            await view.close()
            return
        self._server_error = None
        self._announce()

    def _changed(self, subject: _Subject, view: PreferencesView, changes: list[KeyChange]) -> None:
        if view.snapshots == 1 and view.changes_applied == 0:
            return  # the view's first snapshot: nothing changed for anyone evaluating it
        user_id, org_id = subject.key
        self.emit_provider_configuration_changed(
            ProviderEventDetails(
                flags_changed=sorted({change.key for change in changes}),
                metadata={"targeting_key": user_id, "org": org_id},
            )
        )

    def _close_evicted(self, subjects: list[_Subject]) -> None:
        for subject in subjects:
            if subject.view is not None:  # one still opening closes itself once open
                task = asyncio.get_running_loop().create_task(subject.view.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _close_all(self, subjects: list[_Subject]) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        opening = list(self._opening)
        for task in opening:
            task.cancel()
        await asyncio.gather(*opening, return_exceptions=True)
        for subject in subjects:
            if subject.view is not None:
                await subject.view.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # --- lifecycle and health -----------------------------------------------------------------

    def _start(self) -> _LoopThread:
        with self._lock:
            if self._runtime is not None:
                return self._runtime

        def make_client() -> AsyncPrefdClient:
            return AsyncPrefdClient(
                self._target,
                self._token,
                timeout_s=self._timeout_s,
                credentials=self._credentials,
                tls=self._tls,
                options=self._options,
            )

        runtime = _LoopThread(make_client)

        async def start_monitor() -> None:
            self._monitor = asyncio.create_task(self._watch_health(), name="prefd-openfeature-health")

        runtime.run(start_monitor())
        with self._lock:
            self._runtime = runtime
        return runtime

    async def _check_server(self, client: AsyncPrefdClient) -> None:
        await client.list_definitions(preferences_pb2.ListDefinitionsRequest(page_size=1))

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self._health_check_s)
            try:
                self._announce()
            except Exception:  # a failing event dispatch must not end the health check
                log.exception("prefd OpenFeature provider: announcing its state failed")

    def _announce(self) -> None:
        """Emit an event when the provider's state (worst of its views' and of the last open) changed.
        Runs on the provider's loop only."""
        with self._lock:
            views = [subject.view for subject in self._subjects.values() if subject.view is not None]
        stale = [view for view in views if view.stale]
        refused = [view for view in stale if view.last_error is not None and view.last_error.code in _REFUSED]
        server_error = self._server_error
        if server_error is not None or refused:
            state = "error"
        elif stale:
            state = "stale"
        else:
            state = "ready"
        if state == self._announced:
            return
        self._announced = state
        if state == "ready":
            self.emit_provider_ready(ProviderEventDetails(message="every view is live"))
        elif state == "stale":
            message = f"{len(stale)} of {len(views)} views have had no healthy stream for {self._grace_s} s"
            self.emit_provider_stale(ProviderEventDetails(message=message, metadata={"stale_views": len(stale)}))
        else:
            error = server_error or (refused[0].last_error if refused else None)
            self.emit_provider_error(ProviderEventDetails(message=str(error), error_code=ErrorCode.GENERAL))
