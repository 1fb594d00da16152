"""OpenTelemetry's side of prefd's tracing (needs prefd-server[tracing]): the tracer provider and its
exporters, the asyncpg and redis instrumentations, and the span of each prefd RPC.

Each unary call is one SERVER span named `package.Service/Method`, continuing the caller's W3C
`traceparent`/`tracestate` (or whatever OTEL_PROPAGATORS names; a malformed header is ignored and the
call starts a new trace), with rpc.system, rpc.service, rpc.method, rpc.grpc.status_code and
prefd.request_id. A server stream's span covers its setup only, up to its first message (for Watch*:
WatchStarted or WatchCompacted), and carries prefd.stream.setup=true; its status code is there only when
the stream ended before that message. A watch may run for days: its messages are not spans.

The span is the current one while the handler runs, so the instrumentations' PostgreSQL and Redis spans
are its children, and so are those of work it spawns (the cache's Redis deletes after a write). Spans
without a parent other than an RPC's are dropped: the feed reader's polls, health probes and the shared
cache loads (which run in an empty context on purpose, kernel/scoped_cache.py) are not traced.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextvars import Token
from importlib.metadata import entry_points
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from prefd_server.rpc.principal import current_request
from prefd_server.rpc.tracing import EXPORTER_GROUP, CallObserver, TracingSettings

# At stop, spans still queued have this long to reach the collector (an unreachable one would hold the
# stop for the exporter's whole timeout, with retries).
FLUSH_AT_STOP_S = 2.0
REQUEST_ID = "prefd.request_id"
STATUS_CODE = "rpc.grpc.status_code"
STREAM_SETUP = "prefd.stream.setup"
# The codes that mark a gRPC server span as failed (OpenTelemetry's semantic conventions for RPC).
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

Unary = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
Stream = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncGenerator[Any, None]]


class WithinCalls(Sampler):
    """`inner`'s decision for RPC spans (SERVER) and for spans with a parent; every other span is dropped
    (database and Redis work outside any call: feed polls, health probes, shared cache loads)."""

    def __init__(self, inner: Sampler) -> None:
        self._inner = inner

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if kind is not SpanKind.SERVER and not trace.get_current_span(parent_context).get_span_context().is_valid:
            return SamplingResult(Decision.DROP)
        return self._inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"WithinCalls{{{self._inner.get_description()}}}"


class _Libraries:
    """The asyncpg and redis instrumentations. They patch the libraries' classes for the whole process, so
    they stay in while any traced server runs, and the first one's provider receives their spans."""

    def __init__(self) -> None:
        self.users = 0

    def hold(self, provider: TracerProvider) -> None:
        if self.users == 0:
            AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]  # untyped __init__
            RedisInstrumentor().instrument(tracer_provider=provider)
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            AsyncPGInstrumentor().uninstrument()  # type: ignore[no-untyped-call]  # untyped __init__
            RedisInstrumentor().uninstrument()


_LIBRARIES = _Libraries()


def _resource() -> Resource:
    """OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; service.name `prefd` unless they name one."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "prefd"}))
    return resource


def _exporter(name: str) -> SpanExporter:
    """A new exporter from the entry point `name` (tracing_settings checked that it is installed)."""
    (entry_point,) = entry_points(group=EXPORTER_GROUP, name=name)
    exporter: SpanExporter = entry_point.load()()
    return exporter


class _StatusOnSpan:
    """The call's metrics observer, and the status code written on the call's span (the current one when
    a call ends before its span does: every unary call, a stream that ended during its setup)."""

    __slots__ = ("_metrics",)

    def __init__(self, metrics: CallObserver) -> None:
        self._metrics = metrics

    def observe(self, code: grpc.StatusCode, seconds: float) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute(STATUS_CODE, code.value[0])
            if code in _SERVER_ERRORS:
                span.set_status(Status(StatusCode.ERROR, code.name))
        self._metrics.observe(code, seconds)


class RpcTracing:
    """Tracing of one server: its provider, and the wrappers the middleware puts around each prefd method
    at registration (an untraced server has no RpcTracing and its calls pay nothing for tracing)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("prefd_server.rpc")
        self._propagator = propagate.get_global_textmap()
        self._fields = frozenset(self._propagator.fields)

    @classmethod
    def start(cls, settings: TracingSettings) -> RpcTracing:
        """A provider sending to the exporters `settings` name, and the libraries instrumented for it."""
        provider = TracerProvider(resource=_resource(), shutdown_on_exit=False)
        # The sampler the OTEL_TRACES_SAMPLER* variables chose, within calls only (set before any tracer exists).
        provider.sampler = WithinCalls(provider.sampler)
        if settings.exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(settings.exporter))
        for name in settings.exporters:
            provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
        _LIBRARIES.hold(provider)
        return cls(provider)

    async def shutdown(self, flush_s: float = FLUSH_AT_STOP_S) -> None:
        """Take the instrumentations out (once no other traced server runs), and flush what is queued for
        at most `flush_s` (then the process may exit without it: the flush runs in a daemon thread)."""
        _LIBRARIES.release()
        loop = asyncio.get_running_loop()
        flushed: asyncio.Future[None] = loop.create_future()

        def done() -> None:
            if not flushed.done():
                flushed.set_result(None)

        def flush() -> None:
            try:
                self.provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                    loop.call_soon_threadsafe(done)

        threading.Thread(target=flush, name="prefd-tracing-flush", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(flushed), flush_s)

    def observer(self, metrics: CallObserver) -> CallObserver:
        """`metrics` and the status code of each call on its span."""
        return _StatusOnSpan(metrics)

    def unary(self, behavior: Unary, method: str) -> Unary:
        """`behavior` (the middleware's wrapper of a unary method) inside the call's span."""
        name, attributes = _identity(method)
        start = self._start

        async def traced_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            span, token = start(context, name, attributes)
            try:
                return await behavior(request, context)
            finally:
                _end(span, token)

        return traced_unary

    def stream(self, behavior: Stream, method: str) -> Stream:
        """`behavior` (the middleware's wrapper of a server-streaming method) with a span over its setup."""
        name, attributes = _identity(method)
        attributes = {**attributes, STREAM_SETUP: True}
        start = self._start

        async def traced_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncGenerator[Any, None]:
            span, token = start(context, name, attributes)
            in_setup = True
            try:
                # Closed here, in this task, so that a stream ending during its setup ends inside the span.
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        if in_setup:
                            in_setup = False
                            _end(span, token)
                        yield response
            finally:
                if in_setup:
                    _end(span, token)

        return traced_stream

    def _start(
        self, context: grpc.aio.ServicerContext[Any, Any], name: str, attributes: Attributes
    ) -> tuple[Span, Token[Context]]:
        """The call's span, child of the caller's trace context (if its metadata carries a valid one), made current."""
        carrier = {
            key: value
            for key, value in context.invocation_metadata() or ()
            if key in self._fields and isinstance(value, str)
        }
        parent = self._propagator.extract(carrier) if carrier else Context()
        span = self._tracer.start_span(name, parent, SpanKind.SERVER, attributes)
        return span, otel_context.attach(trace.set_span_in_context(span, parent))


def _identity(method: str) -> tuple[str, dict[str, str | bool]]:
    """The span name and fixed attributes of `/package.Service/Method`."""
    _, service, name = method.split("/")
    return f"{service}/{name}", {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _end(span: Span, token: Token[Context]) -> None:
    """Name the call's request id on its span, stop it being current, and end it."""
    request = current_request()
    if request is not None:
        span.set_attribute(REQUEST_ID, request[0])
    otel_context.detach(token)
    span.end()
