"""Observers of a prefd host from the outside, for the hosts and partition tests: a watcher that resumes from
its cursor whenever its stream is dropped or refused, a paced writer, and a timeline of grpc.health.v1
statuses."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.kernel.tokens import TokenKey
from tests.helpers.auth import auth
from tests.helpers.history import Applied, FeedWatch, scope_of
from tests.helpers.requests import set_request

ADMIN = auth("admin")
# How soon a refused watch asks again (a client's retry pace, not a wait for an event).
RETRY_PACE_S = 0.05
KeyName = tuple[str, str, str]  # (scope kind, scope id, key)


@dataclass(eq=False)
class ResumingWatcher(FeedWatch):
    """A subject watch that records every preference change it receives (as the history checker takes them)
    and, when its stream ends or is refused with UNAVAILABLE, or drop() is called, opens a new one from the
    last cursor it holds, as prefd's client library does."""

    name: str
    stub: preferences_pb2_grpc.PreferencesServiceStub
    tokens: TokenKey
    subject: common_pb2.Subject
    events: list[Applied] = field(default_factory=list)
    latest: dict[KeyName, int] = field(default_factory=dict)
    cursor: str = ""
    streams: int = 0  # streams that started (the first and every resumed one)
    refused: int = 0  # attempts answered UNAVAILABLE
    ends: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, why) of each stream's end
    # (monotonic time, details) of each stream the server ended with UNAVAILABLE after it had started
    # (a broken stream, where `refused` also counts attempts refused before they started).
    broken: list[tuple[float, str]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    stopped: BaseException | None = None
    _call: Any = None
    _dropping: bool = False

    async def _follow(self) -> None:
        while True:
            await self._one_stream()

    def drop(self) -> None:
        """End the current stream from the client side; the watcher resumes from its cursor."""
        if self._call is not None:
            self._dropping = True
            self._call.cancel()

    async def _one_stream(self) -> None:
        request = preferences_pb2.WatchPreferencesRequest(subject=self.subject)
        resume_from = self.cursor
        if resume_from:
            request.start_cursor.token = resume_from
        call = self._call = self.stub.WatchPreferences(request, metadata=ADMIN)
        opened = self.streams
        try:
            async for message in call:
                self._receive(message, resume_from)
                async with self.changed:
                    self.changed.notify_all()
            self.ends.append((time.monotonic(), "ended by the server with OK"))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._dropping or (task is not None and task.cancelling()):
                raise
            self.ends.append((time.monotonic(), "dropped by the client"))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            self.ends.append((time.monotonic(), f"{exc.code().name}: {exc.details()}"))
            if self.streams > opened:
                self.broken.append((time.monotonic(), exc.details() or ""))
            self.refused += 1
            async with self.changed:
                self.changed.notify_all()
            await asyncio.sleep(RETRY_PACE_S)
        finally:
            self._call = None
            self._dropping = False

    def _receive(self, message: preferences_pb2.WatchPreferencesResponse, resume_from: str) -> None:
        which = message.WhichOneof("message")
        if which == "started":
            self.streams += 1
            if resume_from:
                # The stream resumes exactly where the previous one left off.
                assert self.position(message.started.cursor.token) == self.position(resume_from), self.name
            else:
                self.cursor = message.started.cursor.token
        elif which == "change":
            change = message.change
            assert change.kind == common_pb2.CHANGE_KIND_PREFERENCE, (self.name, change)
            applied = Applied.received(change, self.position(change.cursor.token))
            self.events.append(applied)
            applied.raise_latest(self.latest)
            self.cursor = change.cursor.token
        elif which == "progress":
            self.cursor = message.progress.cursor.token
        else:
            raise AssertionError(f"{self.name}: unexpected {which}")

    def has(self, target: Mapping[KeyName, int]) -> bool:
        return all(self.latest.get(name, 0) >= version for name, version in target.items())

    async def wait_until(self, predicate: Callable[[], bool], deadline_s: float, what: str) -> float:
        """Seconds until `predicate()` holds (checked on each message); fails at the deadline."""
        start = time.monotonic()
        try:
            async with asyncio.timeout(deadline_s), self.changed:
                await self.changed.wait_for(lambda: self.stopped is not None or predicate())
        except TimeoutError:
            raise AssertionError(f"{self.name}: no {what} within {deadline_s} s") from None
        if self.stopped is not None:
            raise AssertionError(f"{self.name} stopped: {self.stopped!r}")
        return time.monotonic() - start


@dataclass(eq=False)
class PacedWriter:
    """Writes one key at a time, round the plan, to whichever stub `target()` names, about `rate` per
    second; remembers the version each reply reports per (scope, key)."""

    plan: Sequence[tuple[common_pb2.Scope, str, Sequence[Any]]]
    target: Callable[[], preferences_pb2_grpc.PreferencesServiceStub]
    rate: float
    written: dict[KeyName, int] = field(default_factory=dict)
    count: int = 0
    failed: BaseException | None = None
    advanced: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._write(stop)
        except BaseException as exc:
            self.failed = exc
            async with self.advanced:
                self.advanced.notify_all()
            raise

    async def _write(self, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            scope, key, values = self.plan[n % len(self.plan)]
            value = values[(n // len(self.plan)) % len(values)]  # never the key's previous value
            n += 1
            reply = await self.target().SetPreferences(set_request(scope, {key: value}), metadata=ADMIN, timeout=10)
            (change,) = reply.changes
            self.written[(*scope_of(scope), key)] = change.new_version
            self.count += 1
            async with self.advanced:
                self.advanced.notify_all()
            with contextlib.suppress(TimeoutError):
                # The writer's pace, cut short when asked to stop.
                async with asyncio.timeout(1 / self.rate):
                    await stop.wait()

    async def wait_for_count(self, count: int, deadline_s: float) -> None:
        async with asyncio.timeout(deadline_s), self.advanced:
            await self.advanced.wait_for(lambda: self.failed is not None or self.count >= count)
        if self.failed is not None:
            raise AssertionError(f"a write failed: {self.failed!r}")


@dataclass(eq=False)
class HealthTimeline:
    """Every grpc.health.v1 status a Watch stream reports for one service, with the time it arrived."""

    stub: health_pb2_grpc.HealthStub
    service: str
    seen: list[tuple[float, int]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self) -> None:
        async for reply in self.stub.Watch(health_pb2.HealthCheckRequest(service=self.service)):
            async with self.changed:
                self.seen.append((time.monotonic(), reply.status))
                self.changed.notify_all()

    async def first_after(self, since: float, status: int, deadline_s: float) -> float:
        """Seconds from `since` (monotonic) to the first `status` reported after it."""

        def found() -> float | None:
            return next((at - since for at, s in self.seen if at >= since and s == status), None)

        try:
            async with asyncio.timeout(deadline_s), self.changed:
                await self.changed.wait_for(lambda: found() is not None)
        except TimeoutError:
            raise AssertionError(f"{self.service}: no status {status} within {deadline_s} s: {self.seen}") from None
        result = found()
        assert result is not None
        return result
