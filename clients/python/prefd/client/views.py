"""Live local views: a snapshot, then a watch from the snapshot's cursor, kept in memory.

Reads (`get`, `as_dict`, `provenance`, ...) never do I/O: they read the view's dictionaries, which
only the view's own task replaces or updates. The task resumes a broken stream from its cursor with
exponential backoff and full jitter, re-snapshots when the server answers `compacted` (the cursor
is older than the retained history) or `erased`, and marks the view stale after a grace period
without a healthy stream; a stale view keeps serving its last values unless told to raise.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format

from prefd.client.errors import PrefdError
from prefd.v1 import ai_config_pb2, common_pb2, preferences_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")

# Refusals that retrying cannot cure while the token and subject stay the same.
_FATAL = frozenset(
    {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT}
)
_MISSING: Any = object()


class StaleViewError(PrefdError):
    """A read from a view configured to raise while it has had no healthy stream for its grace period."""

    def __init__(self, seconds: float) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, f"no healthy stream for {seconds:.1f} s", "VIEW_STALE")


@dataclass(frozen=True, slots=True)
class KeyChange:
    """One key whose effective value changed, as the view saw it: `old` / `new` are None when absent.
    Each change event carries the key's effective value when it is sent, so changes replayed after
    a reconnect (or replaced by a re-snapshot) arrive as one step to the latest value."""

    key: str
    old: Any
    new: Any


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: full jitter over an exponentially growing cap."""

    initial_s: float = 0.05
    max_s: float = 2.0
    multiplier: float = 2.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_s, self.initial_s * self.multiplier**attempt))


def typed_value(value: common_pb2.TypedValue | None) -> Any:
    """A TypedValue as a Python value (None when unset)."""
    if value is None:
        return None
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "string_list_value":
        return list(value.string_list_value.values)
    if kind == "json_value":
        return json_format.MessageToDict(value.json_value)
    return getattr(value, kind)


Caller = Callable[[str, str, Any], Any]
Streamer = Callable[[str, str, Any], AsyncIterator[Any]]


class _LiveView(abc.ABC):
    """The snapshot-then-watch loop shared by the preference and AI configuration views."""

    _kind = "view"

    def __init__(
        self,
        unary: Caller,
        stream: Streamer,
        *,
        grace_s: float,
        raise_when_stale: bool,
        backoff: Backoff,
        open_timeout_s: float,
    ) -> None:
        self._unary = unary
        self._stream = stream
        self._grace_s = grace_s
        self._raise_when_stale = raise_when_stale
        self._backoff = backoff
        self._open_timeout_s = open_timeout_s
        self._cursor = ""
        self._unhealthy_since: float | None = time.monotonic()
        self._started = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.snapshots = 0
        self.reconnects = 0
        self.last_error: PrefdError | None = None

    # --- reads (no I/O) ------------------------------------------------------------------

    @property
    def cursor(self) -> str:
        """The feed position every value in the view reflects."""
        return self._cursor

    @property
    def stale(self) -> bool:
        """True after `grace_s` without a healthy stream (the values may be behind)."""
        since = self._unhealthy_since
        return since is not None and time.monotonic() - since > self._grace_s

    def _check_fresh(self) -> None:
        if self._raise_when_stale and self.stale:
            assert self._unhealthy_since is not None
            raise StaleViewError(time.monotonic() - self._unhealthy_since)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Snapshot, then start the watch; returns once the stream is live. Raises typed errors.
        (The client's `preferences()` / `ai_config()` call this.)"""
        await self._snapshot()
        self._task = asyncio.create_task(self._run(), name=f"prefd-{self._kind}-view")
        try:
            await asyncio.wait_for(asyncio.shield(self._started), self._open_timeout_s)
        except TimeoutError:
            await self.close()
            raise PrefdError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"the watch did not start within {self._open_timeout_s} s"
            ) from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop watching (the values stay readable)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        attempt = 0
        resnapshot = False
        while not self._closed:
            failed = False
            try:
                if resnapshot:
                    await self._snapshot()
                    resnapshot = False
                async for message in self._stream_from(self._cursor):
                    which = message.WhichOneof("message")
                    if which == "started":
                        self._healthy()
                        attempt = 0
                    elif which in ("compacted", "erased"):
                        if which == "erased":
                            self._erased()
                        resnapshot = True
                        break
                    else:
                        self._apply(which, message)
                self._unhealthy()
            except Exception as exc:
                failed = True
                self._unhealthy()
                if isinstance(exc, PrefdError):
                    error = exc
                else:
                    log.exception("%s view: unexpected error; retrying", self._kind)
                    error = PrefdError(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
                self.last_error = error
                if not self._started.done():
                    self._started.set_exception(error)
                    return
                if error.code in _FATAL:
                    log.warning("%s view: %s; retrying", self._kind, error)
            if self._closed:
                return
            if failed or not resnapshot:  # a compacted cursor re-snapshots at once
                self.reconnects += 1
                await asyncio.sleep(self._backoff.delay(attempt))
                attempt += 1

    def _healthy(self) -> None:
        self._unhealthy_since = None
        if not self._started.done():
            self._started.set_result(None)

    def _unhealthy(self) -> None:
        if self._unhealthy_since is None:
            self._unhealthy_since = time.monotonic()

    # --- per view ------------------------------------------------------------------------

    @abc.abstractmethod
    def _stream_from(self, cursor: str) -> AsyncIterator[Any]:
        """The view's watch from `cursor`."""

    @abc.abstractmethod
    async def _snapshot(self) -> None:
        """Replace the view's contents with a fresh read, its cursor included."""

    @abc.abstractmethod
    def _apply(self, which: str, message: Any) -> None:
        """Apply one watch message (not `started`, `compacted` or `erased`)."""

    @abc.abstractmethod
    def _erased(self) -> None:
        """The watched user's data was erased (a re-snapshot follows): forget what assumed its history."""


class PreferencesView(_LiveView):
    """A subject's effective preferences, live. Create with `await client.preferences(user_id)`."""

    _kind = "preferences"

    def __init__(
        self,
        unary: Caller,
        stream: Streamer,
        subject: common_pb2.Subject,
        key_prefixes: Sequence[str],
        **options: Any,
    ) -> None:
        super().__init__(unary, stream, **options)
        self._subject = subject
        self._prefixes = list(key_prefixes)
        self._values: dict[str, Any] = {}
        self._provenance: dict[str, common_pb2.Provenance] = {}
        # Highest version applied per (kind, scope, key): the view never goes back (until the user is
        # erased: their versions start again).
        self._versions: dict[tuple[int, str, str], int] = {}
        self._callbacks: list[Callable[[list[KeyChange]], None]] = []
        self.changes_applied = 0

    # --- reads ---------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The effective value of `key` (`default` when the key is not defined)."""
        self._check_fresh()
        return self._values.get(key, default)

    def get_bool(self, key: str, default: bool = False) -> bool:
        return bool(self.get(key, default))

    def get_int(self, key: str, default: int = 0) -> int:
        return int(self.get(key, default))

    def get_float(self, key: str, default: float = 0.0) -> float:
        return float(self.get(key, default))

    def get_str(self, key: str, default: str = "") -> str:
        return str(self.get(key, default))

    def get_list(self, key: str) -> list[str]:
        value = self.get(key)
        return list(value) if value is not None else []

    def provenance(self, key: str) -> common_pb2.Provenance | None:
        """Where the value comes from: layer, scope, version, time, actor."""
        self._check_fresh()
        return self._provenance.get(key)

    def as_flat_dict(self) -> dict[str, Any]:
        """Every key and its value."""
        self._check_fresh()
        return dict(self._values)

    def as_dict(self) -> dict[str, Any]:
        """Every value, nested by the dots of its key (`display.theme` -> {"display": {"theme": ...}})."""
        nested: dict[str, Any] = {}
        for key, value in sorted(self.as_flat_dict().items()):
            node = nested
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return nested

    def on_change(self, callback: Callable[[list[KeyChange]], None]) -> None:
        """Call `callback(changes)` (in the view's event loop) after each applied change or re-snapshot."""
        self._callbacks.append(callback)

    # --- feeding -------------------------------------------------------------------------

    def _stream_from(self, cursor: str) -> AsyncIterator[Any]:
        request = preferences_pb2.WatchPreferencesRequest(
            subject=self._subject, key_prefixes=self._prefixes, start_cursor=common_pb2.Cursor(token=cursor)
        )
        return self._stream("prefd.v1.PreferencesService", "WatchPreferences", request)

    async def _snapshot(self) -> None:
        request = preferences_pb2.GetEffectivePreferencesRequest(subject=self._subject, key_prefixes=self._prefixes)
        reply: preferences_pb2.GetEffectivePreferencesResponse = await self._unary(
            "prefd.v1.PreferencesService", "GetEffectivePreferences", request
        )
        values = {v.key: typed_value(v.value) for v in reply.values}
        provenance = {v.key: v.provenance for v in reply.values}
        changes = _diff(self._values, values)
        for key, source in provenance.items():
            slot = (common_pb2.CHANGE_KIND_PREFERENCE, _scope_key(source.scope), key)
            if source.version > self._versions.get(slot, 0):
                self._versions[slot] = source.version
        self._values, self._provenance = values, provenance
        self._cursor = reply.cursor.token
        self.snapshots += 1
        self._notify(changes)

    def _erased(self) -> None:
        # The user's overrides are gone and their next ones start again at version 1.
        self._versions.clear()

    def _apply(self, which: str, message: preferences_pb2.WatchPreferencesResponse) -> None:
        if which == "progress":
            self._cursor = message.progress.cursor.token
            return
        if which != "change":
            return
        event = message.change
        slot = (event.kind, _scope_key(event.scope), event.key)
        if event.version and event.version <= self._versions.get(slot, 0):
            self._cursor = event.cursor.token  # already reflected (a resumed stream's overlap)
            return
        self._versions[slot] = event.version
        self.changes_applied += 1
        key = event.key
        old = self._values.get(key, _MISSING)
        if event.HasField("effective"):
            new = typed_value(event.effective.value)
            self._values[key] = new
            self._provenance[key] = event.effective.provenance
        else:
            new = None
            self._values.pop(key, None)
            self._provenance.pop(key, None)
        self._cursor = event.cursor.token
        if old is _MISSING or old != new:
            self._notify([KeyChange(key, None if old is _MISSING else old, new)])

    def _notify(self, changes: list[KeyChange]) -> None:
        if changes:
            _call_each(self._callbacks, changes)


class AIConfigView(_LiveView):
    """A subject's effective AI configuration and budget events, live (`await client.ai_config(...)`)."""

    _kind = "ai_config"

    def __init__(self, unary: Caller, stream: Streamer, subject: common_pb2.Subject, **options: Any) -> None:
        super().__init__(unary, stream, **options)
        self._subject = subject
        self._configuration = ai_config_pb2.AIConfiguration()
        self._provenance: Mapping[str, ai_config_pb2.AIFieldProvenance] = {}
        self._violations: list[ai_config_pb2.AIConfigViolation] = []
        self._on_change: list[Callable[[ai_config_pb2.AIConfiguration], None]] = []
        self._on_budget: list[Callable[[ai_config_pb2.BudgetThresholdCrossed], None]] = []

    @property
    def configuration(self) -> ai_config_pb2.AIConfiguration:
        """The effective configuration (a message the view replaces, never mutates: safe to keep)."""
        self._check_fresh()
        return self._configuration

    def provenance(self, field_path: str) -> ai_config_pb2.AIFieldProvenance | None:
        """Which layer and config set a field (`model.temperature`)."""
        self._check_fresh()
        return self._provenance.get(field_path)

    @property
    def violations(self) -> list[ai_config_pb2.AIConfigViolation]:
        """Rules the merged configuration breaks (set by different layers)."""
        return list(self._violations)

    def on_change(self, callback: Callable[[ai_config_pb2.AIConfiguration], None]) -> None:
        """Call `callback(configuration)` after each change to the effective configuration."""
        self._on_change.append(callback)

    def on_budget(self, callback: Callable[[ai_config_pb2.BudgetThresholdCrossed], None]) -> None:
        """Call `callback(crossed)` when the subject's spend crosses a budget threshold."""
        self._on_budget.append(callback)

    def _stream_from(self, cursor: str) -> AsyncIterator[Any]:
        request = ai_config_pb2.WatchAIConfigRequest(
            subject=self._subject, start_cursor=common_pb2.Cursor(token=cursor)
        )
        return self._stream("prefd.v1.AIConfigService", "WatchAIConfig", request)

    async def _snapshot(self) -> None:
        request = ai_config_pb2.GetEffectiveAIConfigRequest(subject=self._subject)
        reply: ai_config_pb2.GetEffectiveAIConfigResponse = await self._unary(
            "prefd.v1.AIConfigService", "GetEffectiveAIConfig", request
        )
        changed = reply.configuration != self._configuration
        self._set(reply.configuration, reply.provenance, reply.violations)
        self._cursor = reply.cursor.token
        self.snapshots += 1
        if changed:
            self._notify_change()

    def _erased(self) -> None:
        """Nothing here assumes the history: the re-snapshot replaces the configuration."""

    def _apply(self, which: str, message: ai_config_pb2.WatchAIConfigResponse) -> None:
        if which == "progress":
            self._cursor = message.progress.cursor.token
        elif which == "config_changed":
            event = message.config_changed
            changed = event.configuration != self._configuration
            self._set(event.configuration, event.provenance, event.violations)
            self._cursor = event.cursor.token
            if changed:
                self._notify_change()
        elif which == "budget":
            self._cursor = message.budget.cursor.token
            _call_each(self._on_budget, message.budget.crossed)

    def _set(
        self,
        configuration: ai_config_pb2.AIConfiguration,
        provenance: Mapping[str, ai_config_pb2.AIFieldProvenance],
        violations: Sequence[ai_config_pb2.AIConfigViolation],
    ) -> None:
        fresh = ai_config_pb2.AIConfiguration()
        fresh.CopyFrom(configuration)
        self._configuration = fresh
        self._provenance = {path: source for path, source in provenance.items()}
        self._violations = list(violations)

    def _notify_change(self) -> None:
        _call_each(self._on_change, self._configuration)


def _call_each(callbacks: Sequence[Callable[[T], None]], argument: T) -> None:
    """Call every callback; one that raises is logged and does not stop the others or the view."""
    for callback in callbacks:
        try:
            callback(argument)
        except Exception:
            log.exception("view callback %r failed", callback)


def _scope_key(scope: common_pb2.Scope) -> str:
    return f"{scope.kind}:{scope.id}"


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[KeyChange]:
    return [
        KeyChange(key, old.get(key), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if key not in old or key not in new or old[key] != new[key]
    ]
