"""The floor for bench/watch_propagation.py: a bare grpc.aio server that fans writes out to watch streams.

What it is
    A plain ``grpc.aio.server()`` (default options, no interceptors, no auth, no database, no feed)
    serving two methods by prefd's paths through generic handlers that see raw bytes:

    * ``/prefd.v1.PreferencesService/WatchPreferences``: parses the request to learn the subject
      (user_id, org_id), answers one prebuilt ``started`` message, then forwards whatever is put on
      the stream's own asyncio.Queue (each item already serialized WatchPreferencesResponse bytes)
      until the client cancels or the server stops.
    * ``/prefd.v1.PreferencesService/SetPreferences``: parses the SetPreferencesRequest and, per
      written key, bumps an in-memory version counter for (scope, key), builds ONE serialized
      WatchPreferencesResponse (change: kind PREFERENCE, scope, key, new_value, version, a cursor
      token) and puts those same bytes on the queue of every open stream whose subject the scope
      covers (USER u: the streams of u; ORG o: streams of subjects in o; GLOBAL: all), synchronously
      in one loop, before answering a SetPreferencesResponse whose changes carry old/new version.

    That is the cheapest fan-out grpc.aio allows: no commit, no notification, no resolution, one
    message built once per write, one queue put per recipient, then grpc.aio's own cost to wake each
    stream's handler task and send the bytes. Measured with the same client as prefd, the latencies
    it gives are what grpc.aio and the load generator cost on this machine, which prefd cannot beat.

What it is not
    Not a preferences server: every write counts as a change (no comparison with the stored value,
    no validation, no definitions, no org_id or dry_run handling), nothing is persisted, there is no
    ordering guarantee beyond one process's queues, no bookmarks, no resume (start_cursor and
    key_prefixes are ignored), no permission check (call metadata is ignored). Its events are smaller
    than prefd's: they carry no actor, change_time or per-subject ``effective`` value. It fans out
    before it answers the writer (prefd answers after its commit and fans out after), so its events
    can reach watchers before the writer sees its response (negative latencies in the benchmark).

It prints ``floor serving on port N`` once it accepts calls and stops on SIGTERM or SIGINT.

    python bench/fanout_floor_server.py [--host 127.0.0.1] [--port 0]
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator

import grpc
from harness.plain_server import run_plain

from prefd.v1 import common_pb2, preferences_pb2

SERVICE = "prefd.v1.PreferencesService"
STARTED = preferences_pb2.WatchPreferencesResponse(
    started=common_pb2.WatchStarted(cursor=common_pb2.Cursor(token="floor-start"))
).SerializeToString()
USER_KIND = common_pb2.SCOPE_KIND_USER
ORG_KIND = common_pb2.SCOPE_KIND_ORG
GLOBAL_KIND = common_pb2.SCOPE_KIND_GLOBAL

Queue = asyncio.Queue[bytes]


class FanoutFloor:
    """Open watch streams indexed by user and org, and per (scope, key) version counters."""

    def __init__(self) -> None:
        self.by_user: defaultdict[str, set[Queue]] = defaultdict(set)
        self.by_org: defaultdict[str, set[Queue]] = defaultdict(set)
        self.everyone: set[Queue] = set()
        self.versions: dict[tuple[int, str, str], int] = {}
        self.positions = itertools.count(1)

    async def watch(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        """WatchPreferences for a subject: `started`, then every event put on this stream's queue."""
        parsed = preferences_pb2.WatchPreferencesRequest.FromString(request)
        if parsed.WhichOneof("target") != "subject":
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the floor serves subject watches only")
        user, org = parsed.subject.user_id, parsed.subject.org_id
        queue: Queue = asyncio.Queue()
        self.by_user[user].add(queue)
        self.by_org[org].add(queue)
        self.everyone.add(queue)
        try:
            yield STARTED
            while True:
                yield await queue.get()
        finally:
            self.by_user[user].discard(queue)
            self.by_org[org].discard(queue)
            self.everyone.discard(queue)

    def recipients(self, scope: common_pb2.Scope) -> set[Queue]:
        """The streams whose subject `scope` covers."""
        if scope.kind == USER_KIND:
            return self.by_user.get(scope.id, set())
        if scope.kind == ORG_KIND:
            return self.by_org.get(scope.id, set())
        if scope.kind == GLOBAL_KIND:
            return self.everyone
        return set()

    async def set_preferences(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        """SetPreferences: per written key, one event built once and queued to every recipient; the diff."""
        parsed = preferences_pb2.SetPreferencesRequest.FromString(request)
        changes = []
        for write in parsed.writes:
            counter = (parsed.scope.kind, parsed.scope.id, write.key)
            version = self.versions.get(counter, 0) + 1
            self.versions[counter] = version
            event = preferences_pb2.WatchPreferencesResponse(
                change=preferences_pb2.ChangeEvent(
                    kind=common_pb2.CHANGE_KIND_PREFERENCE,
                    scope=parsed.scope,
                    key=write.key,
                    new_value=write.value,
                    version=version,
                    cursor=common_pb2.Cursor(token=f"floor-{next(self.positions)}"),
                )
            ).SerializeToString()
            for queue in self.recipients(parsed.scope):
                queue.put_nowait(event)
            changes.append(
                preferences_pb2.PreferenceChange(
                    key=write.key, new_value=write.value, old_version=version - 1, new_version=version
                )
            )
        return preferences_pb2.SetPreferencesResponse(changes=changes).SerializeToString()


def build_handler(floor: FanoutFloor) -> grpc.GenericRpcHandler:
    """A generic handler for SERVICE's WatchPreferences and SetPreferences over raw bytes."""
    # No request_deserializer / response_serializer: the handlers see and return raw bytes.
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "WatchPreferences": grpc.unary_stream_rpc_method_handler(floor.watch),
            "SetPreferences": grpc.unary_unary_rpc_method_handler(floor.set_preferences),
        },
    )


def main() -> None:
    run_plain(
        lambda: build_handler(FanoutFloor()),
        "floor",
        "Bare grpc.aio server fanning SetPreferences out to watch streams.",
    )


if __name__ == "__main__":
    main()
