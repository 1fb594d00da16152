"""OpenTelemetry tracing: off unless OTEL_* asks; a traced server's spans (the caller's trace continued, the
status code and request id, PostgreSQL and Redis children, a watch's setup only), seen through the SDK's
in-memory exporter; a malformed traceparent is ignored and the call served."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.app import App
from prefd_server.rpc.auth import TokenVerifier
from prefd_server.rpc.metrics import RpcMetrics
from prefd_server.rpc.middleware import Authenticator
from prefd_server.rpc.tracing import TracingSettings, start_tracing, tracing_settings
from prefd_server.settings import SettingsError
from tests.helpers.auth import auth, unique
from tests.helpers.handlers import HandlerRegistry
from tests.helpers.processes import ROOT, RedisServer, free_port, prefd_process
from tests.helpers.requests import eventually, set_request, user
from tests.helpers.settings import make_settings, process_env

ADMIN = auth("admin")
SET = "prefd.v1.PreferencesService/SetPreferences"
GET = "prefd.v1.PreferencesService/GetEffectivePreferences"
WATCH = "prefd.v1.PreferencesService/WatchPreferences"


@dataclass
class Traced:
    """A server tracing into `spans`, and a stub on it."""

    app: App
    spans: InMemorySpanExporter
    stub: Any  # a PreferencesServiceStub on a grpc.aio channel (its stubs are typed for the blocking API)


@pytest.fixture(scope="module")
async def traced(fresh_database: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Traced]:
    redis_server = RedisServer(free_port())
    await redis_server.start()
    spans = InMemorySpanExporter()
    settings = make_settings(await fresh_database(), tmp_path_factory.mktemp("traced"), redis_url=redis_server.url)
    try:
        async with (
            App(settings, tracing=TracingSettings(exporter=spans)) as app,
            grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
        ):
            yield Traced(app, spans, preferences_pb2_grpc.PreferencesServiceStub(channel))
    finally:
        await redis_server.stop()


def new_trace() -> tuple[str, str]:
    """A trace id and a parent span id, as a caller would send them."""
    return secrets.token_hex(16), secrets.token_hex(8)


def call_metadata(traceparent: str = "", request_id: str = "", **more: str) -> tuple[tuple[str, str], ...]:
    extra = (("traceparent", traceparent),) if traceparent else ()
    return (*ADMIN, *extra, ("x-request-id", request_id or unique("req")), *more.items())


def of_trace(spans: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.context is not None and s.context.trace_id == int(trace_id, 16)]


def server_span(spans: InMemorySpanExporter, request_id: str) -> ReadableSpan:
    """The one RPC span of the call with `request_id`."""
    (span,) = [
        s
        for s in spans.get_finished_spans()
        if s.kind is SpanKind.SERVER and (s.attributes or {}).get("prefd.request_id") == request_id
    ]
    return span


def children(spans: InMemorySpanExporter, parent: ReadableSpan, system: str) -> list[ReadableSpan]:
    """Finished spans of `system` (postgresql, redis) whose parent is `parent`."""
    assert parent.context is not None
    return [
        s
        for s in spans.get_finished_spans()
        if s.parent is not None
        and s.parent.span_id == parent.context.span_id
        and (s.attributes or {}).get("db.system") == system
    ]


def instrumented() -> bool:
    """Whether the asyncpg and redis instrumentations are in (each wraps the libraries' methods)."""
    patched = (
        hasattr(asyncpg.Connection.fetch, "__wrapped__"),
        hasattr(aioredis.Redis.execute_command, "__wrapped__"),
    )
    assert len(set(patched)) == 1, patched
    return patched[0]


# --- off unless asked ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({}, None),
        ({"OTEL_SERVICE_NAME": "prefd-eu", "OTEL_TRACES_SAMPLER": "always_on"}, None),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, None),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, ("otlp_proto_grpc",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317/"}, ("otlp_proto_grpc",)),
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console",)),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp, Console"}, ("otlp_proto_grpc", "console")),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, ("otlp_proto_grpc",)),
    ],
)
def test_tracing_is_on_only_when_the_otel_settings_ask_for_it(environ: dict[str, str], exporters: Any) -> None:
    settings = tracing_settings(environ)
    assert (settings.exporters if settings is not None else None) == exporters


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "'zipkin'"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            "opentelemetry-exporter-otlp-proto-http",
        ),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "pigeon"}, "TRACES_PROTOCOL"),
    ],
)
def test_an_exporter_that_is_not_installed_stops_the_start(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        tracing_settings(environ)


def test_asking_for_tracing_without_the_extra_fails_at_start_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # As if the tracing extra were not installed: importing the instrumentation fails.
    monkeypatch.delitem(sys.modules, "prefd_server.rpc.tracing_otel", raising=False)
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation.asyncpg", None)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    with pytest.raises(SettingsError) as refused:
        App(make_settings("postgresql://127.0.0.1:1/unused", tmp_path))
    message = str(refused.value)
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in message and "prefd-server[tracing]" in message, message
    assert "opentelemetry.instrumentation.asyncpg" in message, message


WITHOUT_OPENTELEMETRY = """
import asyncio, sys
sys.modules["opentelemetry"] = None  # as if the tracing extra were not installed: no opentelemetry.* imports
import grpc
from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.app import App
from tests.helpers.auth import auth
from tests.helpers.settings import make_settings

async def main(url, data_dir):
    async with App(make_settings(url, data_dir, redis_url=None)) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            request = preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id="u1"))
            reply = await preferences_pb2_grpc.PreferencesServiceStub(channel).GetEffectivePreferences(
                request, metadata=auth("admin")
            )
        print("served", len(reply.values), app.tracing)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_the_server_starts_and_serves_without_the_extra(fresh_database: Any, tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    args = [sys.executable, "-c", WITHOUT_OPENTELEMETRY, await fresh_database(), str(tmp_path)]
    child = await asyncio.create_subprocess_exec(*args, cwd=ROOT, env=env, stdout=PIPE, stderr=PIPE)
    async with asyncio.timeout(120):
        out, err = await child.communicate()
    assert child.returncode == 0, err.decode()
    served, values, tracing = out.decode().split()
    assert (served, tracing) == ("served", "None") and int(values) > 0


async def test_the_instrumentations_are_in_only_while_a_traced_server_runs() -> None:
    before = instrumented()  # False unless this module's traced server runs already
    tracing = start_tracing(TracingSettings(exporter=InMemorySpanExporter()))
    assert tracing is not None and instrumented()
    await tracing.shutdown()
    assert instrumented() is before
    assert start_tracing(None) is None


def registered_handlers(tracing: Any, tmp_path: Path) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The handlers the middleware registers for PreferencesService, with `tracing` (or None)."""

    server = HandlerRegistry()
    verifier = TokenVerifier(make_settings("postgresql://127.0.0.1:1/unused", tmp_path))
    authenticator = Authenticator(verifier, RpcMetrics(CollectorRegistry()), tracing=tracing)
    # The generated base servicer (every method UNIMPLEMENTED): only its method names matter here.
    servicer = preferences_pb2_grpc.PreferencesServiceServicer()  # type: ignore[abstract]
    authenticator.add_service(server, preferences_pb2_grpc.add_PreferencesServiceServicer_to_server, servicer)  # type: ignore[arg-type]
    return server.handlers


async def test_an_untraced_server_installs_no_tracing_wrapper_and_makes_no_span(
    app: App, stub: Any, traced: Traced, tmp_path: Path
) -> None:
    assert app.tracing is None  # the shared test server: no OTEL_* variables ask for tracing
    untraced = registered_handlers(None, tmp_path)
    with_tracing = registered_handlers(traced.app.tracing, tmp_path)
    assert untraced.keys() == with_tracing.keys() and GET.split("/")[1] in untraced

    def behaviour(handler: grpc.RpcMethodHandler[Any, Any]) -> Any:
        return handler.unary_unary or handler.unary_stream

    assert {behaviour(h).__module__ for h in untraced.values()} == {"prefd_server.rpc.middleware"}
    assert {behaviour(h).__module__ for h in with_tracing.values()} == {"prefd_server.rpc.tracing_otel"}
    # A call with a trace context to the untraced server, while the instrumentations are in (the traced
    # server runs in this process too): no span of that trace, neither the call's nor its queries'.
    trace_id, parent_id = new_trace()
    uid = unique("u")
    metadata = call_metadata(f"00-{trace_id}-{parent_id}-01")
    await stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=metadata)
    assert instrumented() and of_trace(traced.spans, trace_id) == []


# --- a traced server --------------------------------------------------------------------------------------


async def test_a_unary_call_continues_the_callers_trace_with_database_and_redis_children(traced: Traced) -> None:
    trace_id, parent_id = new_trace()
    request_id = unique("req")
    uid = unique("u")
    metadata = call_metadata(f"00-{trace_id}-{parent_id}-01", request_id)
    await traced.stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=metadata)

    span = server_span(traced.spans, request_id)
    assert span.context is not None and span.parent is not None
    assert (span.name, span.kind) == (SET, SpanKind.SERVER)
    assert (span.context.trace_id, span.parent.span_id, span.parent.is_remote) == (
        int(trace_id, 16),
        int(parent_id, 16),
        True,
    )
    assert dict(span.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "prefd.v1.PreferencesService",
        "rpc.method": "SetPreferences",
        "rpc.grpc.status_code": 0,
        "prefd.request_id": request_id,
    }
    assert span.status.status_code is StatusCode.UNSET
    queries = children(traced.spans, span, "postgresql")
    assert queries and all(q.kind is SpanKind.CLIENT for q in queries)
    assert all(q.context is not None and q.context.trace_id == int(trace_id, 16) for q in queries)
    assert any("INSERT" in str((q.attributes or {}).get("db.statement", "")) for q in queries)

    # The cache forgets the written scope in Redis from a task the call spawned: a child too, maybe later.
    async def redis_child() -> bool:
        return bool(children(traced.spans, span, "redis"))

    await eventually(redis_child, 5)
    (delete,) = children(traced.spans, span, "redis")
    # Redis commands are recorded without their arguments (keys name users).
    assert (delete.kind, (delete.attributes or {}).get("db.statement")) == (SpanKind.CLIENT, "DEL ?")


async def test_work_outside_any_call_makes_no_span(traced: Traced) -> None:
    # A subject nobody read before: its layers come from a shared load, which runs outside the call's
    # context (kernel/scoped_cache.py); the feed reader polls PostgreSQL all the while.
    request_id = unique("req")
    request = preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=unique("u")))
    await traced.stub.GetEffectivePreferences(request, metadata=call_metadata(request_id=request_id))
    assert server_span(traced.spans, request_id).parent is None
    orphans = [s.name for s in traced.spans.get_finished_spans() if s.parent is None and s.kind is not SpanKind.SERVER]
    assert orphans == []


async def test_a_caller_that_does_not_sample_gets_no_spans(traced: Traced) -> None:
    trace_id, parent_id = new_trace()
    uid = unique("u")
    metadata = call_metadata(f"00-{trace_id}-{parent_id}-00")
    await traced.stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=metadata)
    assert of_trace(traced.spans, trace_id) == []


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        "00-{trace}-{parent}",  # no flags
        "00-{trace}-{parent}-01-extra",  # version 00 has exactly four parts
        "ff-{trace}-{parent}-01",  # version ff is invalid
        "00-00000000000000000000000000000000-{parent}-01",  # all-zero trace id
        "00-{trace}-0000000000000000-01",  # all-zero parent id
        "00-{TRACE}-{parent}-01",  # upper-case hex
        "00-{trace}1-{parent}-01",  # a trace id one digit too long
        "00-{trace}-{parent}-01" + "x" * 4000,
    ],
)
async def test_a_malformed_traceparent_is_ignored_and_the_call_served(traced: Traced, traceparent: str) -> None:
    trace_id, parent_id = new_trace()
    header = traceparent.format(trace=trace_id, parent=parent_id, TRACE=trace_id.upper())
    request_id = unique("req")
    request = preferences_pb2.GetEffectivePreferencesRequest(
        subject=common_pb2.Subject(user_id=unique("u")), key_prefixes=["display.theme"]
    )
    reply = await traced.stub.GetEffectivePreferences(request, metadata=call_metadata(header, request_id))
    assert [v.key for v in reply.values] == ["display.theme"]
    span = server_span(traced.spans, request_id)
    assert span.context is not None
    assert span.parent is None and span.context.trace_id != int(trace_id, 16)  # a new root
    assert (span.name, (span.attributes or {}).get("rpc.grpc.status_code")) == (GET, 0)


async def test_a_malformed_tracestate_leaves_the_parent(traced: Traced) -> None:
    trace_id, parent_id = new_trace()
    request_id = unique("req")
    metadata = call_metadata(f"00-{trace_id}-{parent_id}-01", request_id, tracestate="!!not=a,,state==")
    await traced.stub.SetPreferences(set_request(user(unique("u")), {"display.theme": "dark"}), metadata=metadata)
    span = server_span(traced.spans, request_id)
    assert span.parent is not None and span.parent.span_id == int(parent_id, 16)


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        (ADMIN, grpc.StatusCode.INVALID_ARGUMENT),  # the key is not defined
        ((), grpc.StatusCode.UNAUTHENTICATED),
    ],
)
async def test_a_refused_call_has_its_code_on_its_span(traced: Traced, metadata: Any, code: grpc.StatusCode) -> None:
    request_id = unique("req")
    request = set_request(user(unique("u")), {"no.such.key": 1})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await traced.stub.SetPreferences(request, metadata=(*metadata, ("x-request-id", request_id)))
    assert refused.value.code() is code
    span = server_span(traced.spans, request_id)
    assert (span.attributes or {}).get("rpc.grpc.status_code") == code.value[0]
    assert span.status.status_code is StatusCode.UNSET  # a caller's mistake, not the server's failure


async def test_a_watch_is_traced_up_to_its_first_message_only(traced: Traced) -> None:
    trace_id, parent_id = new_trace()
    request_id = unique("req")
    uid = unique("u")
    watch = preferences_pb2.WatchPreferencesRequest(subject=common_pb2.Subject(user_id=uid))
    call = traced.stub.WatchPreferences(watch, metadata=call_metadata(f"00-{trace_id}-{parent_id}-01", request_id))
    try:
        first = await call.read()
        assert first.HasField("started")
        # Ended before the first message went out, while the stream stays open.
        span = server_span(traced.spans, request_id)
        assert span.parent is not None and span.parent.span_id == int(parent_id, 16)
        assert span.name == WATCH and span.end_time is not None
        attributes = dict(span.attributes or {})
        assert attributes["prefd.stream.setup"] is True and "rpc.grpc.status_code" not in attributes
        written_at = time.time_ns()
        await traced.stub.SetPreferences(set_request(user(uid), {"display.theme": "dark"}), metadata=ADMIN)
        async with asyncio.timeout(5):
            while not (message := await call.read()).HasField("change"):
                assert message is not grpc.aio.EOF
        # The change went out on the stream; nothing of the stream's trace began after its setup.
        assert span.end_time < written_at
        assert all(s.start_time is not None and s.start_time < written_at for s in of_trace(traced.spans, trace_id))
    finally:
        call.cancel()


async def test_a_watch_refused_in_its_setup_has_its_code_on_its_span(traced: Traced) -> None:
    request_id = unique("req")
    watch = preferences_pb2.WatchPreferencesRequest(subject=common_pb2.Subject(user_id=unique("u")))
    watch.start_cursor.token = "!!not-a-cursor"
    call = traced.stub.WatchPreferences(watch, metadata=call_metadata(request_id=request_id))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    span = server_span(traced.spans, request_id)
    assert (span.attributes or {}).get("rpc.grpc.status_code") == grpc.StatusCode.INVALID_ARGUMENT.value[0]


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps what it is sent."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[trace_service_pb2.ExportTraceServiceRequest] = asyncio.Queue()

    async def Export(self, request: Any, context: Any) -> Any:
        await self.received.put(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_prefd_serve_sends_spans_over_otlp_when_an_endpoint_is_set(fresh_database: Any, tmp_path: Path) -> None:
    collector = Collector()
    receiver = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)  # type: ignore[no-untyped-call]
    collector_port = receiver.add_insecure_port("127.0.0.1:0")
    await receiver.start()
    env = process_env(
        await fresh_database(),
        PREFD_DATA_DIR=str(tmp_path),
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector_port}",
        OTEL_BSP_SCHEDULE_DELAY="20",  # milliseconds between batches
    )
    trace_id, parent_id = new_trace()
    request_id = unique("req")
    request = preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=unique("u")))
    try:
        async with prefd_process(env) as (_proc, port, _lines), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            metadata = call_metadata(f"00-{trace_id}-{parent_id}-01", request_id)
            await preferences_pb2_grpc.PreferencesServiceStub(ch).GetEffectivePreferences(request, metadata=metadata)
            async with asyncio.timeout(10):
                while True:
                    sent = await collector.received.get()
                    found = [
                        (resource_spans.resource, span)
                        for resource_spans in sent.resource_spans
                        for scope_spans in resource_spans.scope_spans
                        for span in scope_spans.spans
                        if any(
                            a.key == "prefd.request_id" and a.value.string_value == request_id for a in span.attributes
                        )
                    ]
                    if found:
                        break
    finally:
        await receiver.stop(0)
    ((resource, span),) = found
    service_name = [a.value.string_value for a in resource.attributes if a.key == "service.name"]
    assert service_name == ["prefd"]
    assert (span.name, span.kind) == (GET, trace_pb2.Span.SPAN_KIND_SERVER)
    assert (span.trace_id.hex(), span.parent_span_id.hex()) == (trace_id, parent_id)
