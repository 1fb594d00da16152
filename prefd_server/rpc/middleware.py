"""The one wrapper around every prefd RPC: request id, auth, limits, permissions, error status, metrics."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc

from prefd_server.kernel.deadline import DEFAULT_CALL_TIMEOUT_S, end_call, start_call
from prefd_server.kernel.errors import Code, PrefdError, ValidationFailed
from prefd_server.rpc.limits import parse_request
from prefd_server.rpc.metrics import RpcMetrics
from prefd_server.rpc.permissions import PERMISSIONS, Access, Admission, admission
from prefd_server.rpc.principal import current_principal, current_request, enter_call, enter_request
from prefd_server.rpc.status import grpc_code, to_status
from prefd_server.rpc.tracing import CallObserver

if TYPE_CHECKING:
    # Only a type here: prefd_server.rpc.auth imports this module to keep its old names.
    from prefd_server.rpc.auth import TokenVerifier
    from prefd_server.rpc.tracing_otel import RpcTracing

log = logging.getLogger(__name__)

# Generated request ids: a per-process random prefix and a counter (unique, and cheap per call).
_REQUEST_ID_PREFIX = secrets.token_hex(6)
_request_counter = itertools.count(1)


def _bytes_passthrough(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    """A serializer that sends prebuilt response bodies (bytes) as they are."""

    def serialize(message: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        assert serializer is not None
        return serializer(message)

    return serialize


class _HandlerCapture:
    """Stands in for a server so a generated add_*_to_server function hands over its handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the method handlers arrive through add_registered_method_handlers."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service = service
        self.handlers = handlers


def add_generic(server: grpc.aio.Server, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
    """Serve `service`'s methods through one generic handler, never as registered methods: grpc.aio's
    server keeps one call request open per registered method and waits on all of them for each call
    that arrives, so each registered method adds to every call's cost (with prefd's 60, more than a
    third of a cached read's)."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, dict(handlers)),))


def add_servicer_generic(server: grpc.aio.Server, add_to_server: Callable[[Any, Any], None], servicer: Any) -> None:
    """A generated add_*_to_server function's handlers, served through one generic handler (add_generic)."""
    capture = _HandlerCapture()
    add_to_server(servicer, capture)
    add_generic(server, capture.service, capture.handlers)


class Authenticator:
    """Wraps every method of a service once, at registration: request id (from `x-request-id` or
    generated, returned in trailing metadata), bearer token -> Principal for the handler, domain
    errors -> rpc Status, prebuilt bytes responses sent as they are, and per-method call metrics; with
    `tracing`, each call inside its span (prefd_server.rpc.tracing_otel)."""

    def __init__(
        self,
        verifier: TokenVerifier,
        metrics: RpcMetrics,
        call_timeout_s: float | None = None,
        permissions: Mapping[str, Access] = PERMISSIONS,
        tracing: RpcTracing | None = None,
    ) -> None:
        self._verifier = verifier
        self._metrics = metrics
        self._permissions = permissions
        self._tracing = tracing
        # Ceiling of a unary call without a client deadline, and of any one database visit (server.deadline).
        self._call_timeout_s = call_timeout_s or DEFAULT_CALL_TIMEOUT_S

    def add_service(self, server: grpc.aio.Server, add_to_server: Callable[[Any, Any], None], servicer: Any) -> None:
        """Register `servicer` (via its generated add_*_to_server function) behind the wrapper; an RPC
        without an entry in the permission table is refused here, at start-up (UnlistedMethod)."""
        capture = _HandlerCapture()
        add_to_server(servicer, capture)
        raw: frozenset[str] = getattr(servicer, "RAW_REQUEST_METHODS", frozenset())
        # Every handler receives the request bytes: the size, parse and input limits run inside the
        # wrapper (after authentication), so a bad request is INVALID_ARGUMENT with the fields named;
        # then the permission table's check, so a refused caller learns nothing of a bad request.
        wrapped = {}
        for name, handler in capture.handlers.items():
            method = f"/{capture.service}/{name}"
            admit = admission(method, self._permissions)
            wrapped[name] = self._wrap(_prepared(handler, name, name in raw, admit), method)
        add_generic(server, capture.service, wrapped)

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        """`handler` (taking the request bytes, see _prepared) inside the call's wrapper."""
        serializer = _bytes_passthrough(handler.response_serializer)
        observer: CallObserver = self._metrics.method(method)
        # Traced or not is decided here, once per method: an untraced server's calls pay nothing for it.
        tracing = self._tracing
        if tracing is not None:
            observer = tracing.observer(observer)
        if handler.unary_unary is not None:
            unary = self._wrap_unary(handler.unary_unary, method, observer)
            return grpc.unary_unary_rpc_method_handler(
                unary if tracing is None else tracing.unary(unary, method),
                request_deserializer=None,
                response_serializer=serializer,
            )
        if handler.unary_stream is not None:
            stream = self._wrap_stream(handler.unary_stream, method, observer)
            return grpc.unary_stream_rpc_method_handler(
                stream if tracing is None else tracing.stream(stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=serializer,
            )
        raise TypeError("prefd services are unary or server-streaming")

    def _begin(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
        """Take or make the request id, return it in trailing metadata, then authenticate."""
        header = request_id = ""
        for name, value in context.invocation_metadata() or ():
            if name == "authorization" and isinstance(value, str):
                header = value
            elif name == "x-request-id" and isinstance(value, str):
                request_id = value[:128]
        request_id = request_id or f"{_REQUEST_ID_PREFIX}-{next(_request_counter):x}"
        enter_request(request_id, method)
        context.set_trailing_metadata((("x-request-id", request_id),))
        enter_call(self._verifier.caller(header, context), context, request_id)

    def _wrap_unary(
        self, behavior: Callable[..., Awaitable[Any]], method: str, observer: CallObserver
    ) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            budget = start_call(context, self._call_timeout_s)
            try:
                self._begin(context, method)
                return await behavior(request, context)
            except BaseException as exc:  # a domain error, an unexpected one, or cancelled
                code, answer = _outcome(exc, context)
                if answer is not None:
                    await _answer(context, answer)
                if not isinstance(exc, PrefdError):
                    raise
            finally:
                end_call(budget)
                _finished(method, observer, code, started)

        return wrapped

    def _wrap_stream(self, behavior: Callable[..., Any], method: str, observer: CallObserver) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            # Streams live as long as their client wants: no ceiling on the call, only on each database visit.
            budget = start_call(context, self._call_timeout_s, stream=True)
            try:
                self._begin(context, method)
                async for response in behavior(request, context):
                    yield response
            except BaseException as exc:  # as for unary calls, or closed (GeneratorExit) when its client left
                code, answer = _outcome(exc, context)
                if answer is not None:
                    await _answer(context, answer)
                if not isinstance(exc, PrefdError):
                    raise
            finally:
                end_call(budget)
                _finished(method, observer, code, started)

        return wrapped


def _outcome(exc: BaseException, context: Any) -> tuple[grpc.StatusCode, grpc.Status | None]:
    """The code a call that raised ends with, and the answer still to send (None when the call has
    answered already or was cancelled: a cancelled or closed stream must not be written to)."""
    if isinstance(exc, PrefdError):
        _log_refusal(exc)
        return grpc_code(exc.code), to_status(exc, _request_id_trailer())
    code = _code_of(exc, context)
    if isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError):
        return code, _unexpected(exc)  # the handler's own abort has answered already
    return code, None


def _prepared(
    handler: grpc.RpcMethodHandler[Any, Any], name: str, raw_request: bool, admit: Admission | None
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` taking the request bytes: size limit, parse and input limits (server.limits) unless
    the servicer parses them itself (`raw_request`: it caches parses on a hot path), then the
    permission table's `admit` check of the caller, if the table has one for the method."""
    if raw_request and admit is None:
        return handler
    parse = handler.request_deserializer
    assert parse is not None

    def request_of(raw: bytes) -> Any:
        request = raw if raw_request else parse_request(raw, parse, name)
        if admit is not None:
            admit(current_principal())
        return request

    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def checked_unary(raw: bytes, context: Any) -> Any:
            return await unary(request_of(raw), context)

        return handler._replace(unary_unary=checked_unary, request_deserializer=None)  # type: ignore[attr-defined,no-any-return]
    stream = handler.unary_stream
    assert stream is not None

    def checked_stream(raw: bytes, context: Any) -> Any:
        return stream(request_of(raw), context)

    return handler._replace(unary_stream=checked_stream, request_deserializer=None)  # type: ignore[attr-defined,no-any-return]


def _finished(method: str, observer: CallObserver, code: grpc.StatusCode, started: float) -> None:
    """Count and time an ended call (one DEBUG line per call when enabled)."""
    elapsed = time.perf_counter() - started
    observer.observe(code, elapsed)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s %s in %.2f ms", method, code.name, elapsed * 1000)


def _request_id_trailer() -> tuple[tuple[str, str], ...]:
    """Trailing metadata returning the call's request id (an abort replaces what was set before)."""
    request = current_request()
    return (("x-request-id", request[0]),) if request is not None else ()


# A call cancelled this close to its deadline was ended by that deadline (on the client's clock).
_DEADLINE_SLACK_S = 0.1


def _code_of(exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """The status a call ends with when its handler raised something other than a domain error: the
    code it aborted with; CANCELLED when it was ended from outside (its client went away), or
    DEADLINE_EXCEEDED when that was its deadline passing; INTERNAL for anything else (never UNKNOWN)."""
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.INTERNAL
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        # The server's deadline trails the client's by the request's transit, so a client whose own
        # deadline passed may cancel just before the server's does.
        remaining = context.time_remaining()
        deadline_passed = remaining is not None and remaining <= _DEADLINE_SLACK_S
        return grpc.StatusCode.DEADLINE_EXCEEDED if deadline_passed else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


async def _answer(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> None:
    """End the call with `status`; once the client's deadline has passed gRPC has ended the call
    already (DEADLINE_EXCEEDED), and the call ends quietly as cancelled rather than send into it."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise asyncio.CancelledError
    await context.abort_with_status(status)


def _unexpected(exc: BaseException) -> grpc.Status:
    """Log an unexpected error once, with its traceback, and make the INTERNAL status that answers it:
    its message and ErrorInfo name the request id the log line carries, never the error's own text."""
    log.error("unexpected error: %s", type(exc).__name__, exc_info=exc)
    request = current_request()
    request_id = request[0] if request is not None else ""
    error = PrefdError(f"internal error; the server logged it under request id {request_id}", request_id=request_id)
    return to_status(error, _request_id_trailer())


def _log_refusal(error: PrefdError) -> None:
    """One line per refused call: code and reason, and the fields of a validation failure, never the
    values (a message may quote a request's value, which may be sensitive)."""
    if isinstance(error, ValidationFailed):
        log.info("refused %s %s fields=%s", error.code.name, error.reason, [v.field for v in error.violations])
    elif error.code is Code.INTERNAL:
        log.error("failed %s %s", error.code.name, error.reason)
    else:
        log.info("refused %s %s", error.code.name, error.reason)
