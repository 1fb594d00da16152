"""Authentication (JWT bearer) and the role -> permission rules every handler checks."""

from __future__ import annotations

import asyncio
import contextvars
import enum
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
from google.protobuf.message import DecodeError

from prefd_server.kernel.deadline import DEFAULT_CALL_TIMEOUT_S, end_call, start_call
from prefd_server.kernel.errors import Code, PermissionDenied, PrefdError, Unauthenticated, ValidationFailed, invalid
from prefd_server.kernel.ids import id_problem
from prefd_server.kernel.model import CallInfo, Scope, ScopeKind, Subject
from prefd_server.rpc.limits import check_request, check_request_size
from prefd_server.rpc.metrics import MethodObserver, RpcMetrics
from prefd_server.rpc.status import grpc_code, to_status
from prefd_server.settings import Settings, SettingsError

log = logging.getLogger(__name__)

MAX_VERIFIED_TOKENS = 10_000


class Role(enum.StrEnum):
    """What a token may do."""

    USER = "user"
    SERVICE = "service"
    ADMIN = "admin"


_READ_ANY = frozenset({Role.SERVICE, Role.ADMIN})

# Reads AI API keys in clear; honoured only on service tokens that carry it explicitly.
READ_SECRETS = "ai:secrets:read"


@dataclass(frozen=True, slots=True)
class Principal:
    """The verified caller of one RPC."""

    subject: str
    org: str
    roles: frozenset[Role]
    permissions: frozenset[str] = frozenset()

    @property
    def is_admin(self) -> bool:
        return Role.ADMIN in self.roles

    @property
    def reads_any(self) -> bool:
        """Service and admin tokens read any subject and scope."""
        return not self.roles.isdisjoint(_READ_ANY)

    @property
    def reads_secrets(self) -> bool:
        """Whether responses may carry API keys in clear (a service token granted ai:secrets:read)."""
        return Role.SERVICE in self.roles and READ_SECRETS in self.permissions

    def require_service(self, action: str) -> None:
        """PERMISSION_DENIED unless the caller is a service or an admin."""
        if self.roles.isdisjoint(_READ_ANY):
            raise PermissionDenied(f"{action} needs the service or admin role", action=action)

    def require_admin(self, action: str) -> None:
        """PERMISSION_DENIED unless the caller is an admin."""
        if not self.is_admin:
            raise PermissionDenied(f"{action} needs the admin role", action=action)

    def may_read(self, user_id: str, org_id: str) -> bool:
        """Whether the caller may read this subject: a user only itself (its own org); service and admin any."""
        if not self.roles.isdisjoint(_READ_ANY):
            return True
        return Role.USER in self.roles and user_id == self.subject and org_id in ("", self.org)

    def require_read(self, subject: Subject) -> None:
        """PERMISSION_DENIED unless may_read."""
        if self.may_read(subject.user_id, subject.org_id):
            return
        raise PermissionDenied(f"{self.subject} may not read subject {subject.user_id}", action="read")

    def require_read_scope(self, scope: Scope) -> None:
        """A user reads only its own USER scope; service and admin read any scope."""
        if not self.roles.isdisjoint(_READ_ANY):
            return
        if Role.USER in self.roles and scope == Scope(ScopeKind.USER, self.subject):
            return
        raise PermissionDenied(f"{self.subject} may not read {scope}", action="read")

    def require_write(self, scope: Scope) -> None:
        """A user writes only its own USER scope; admin writes any; service writes nothing."""
        if self.is_admin:
            return
        if Role.USER in self.roles and scope == Scope(ScopeKind.USER, self.subject):
            return
        raise PermissionDenied(f"{self.subject} may not write {scope}", action="write")


class _Call:
    """The RPC being handled: its verified caller, and (built only when a write needs it) its CallInfo."""

    __slots__ = ("_info", "context", "principal", "request_id")

    def __init__(self, principal: Principal, context: Any, request_id: str) -> None:
        self.principal = principal
        self.context = context
        self.request_id = request_id
        self._info: CallInfo | None = None

    def info(self) -> CallInfo:
        if self._info is None:
            self._info = CallInfo(
                actor=self.principal.subject,
                peer=self.context.peer() or "",
                user_agent=_metadata(self.context).get("user-agent", "")[:256],
                request_id=self.request_id,
            )
        return self._info


_current_call: contextvars.ContextVar[_Call] = contextvars.ContextVar("prefd_call")
# (request id, full method name) of the RPC being handled, set before authentication so that every
# log line of a call, a refused one included, carries them.
_current_request: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar("prefd_request")


def current_request() -> tuple[str, str] | None:
    """(request id, method) of the RPC being handled in this context, if any."""
    return _current_request.get(None)


def current_principal() -> Principal:
    """The verified caller of the RPC being handled."""
    return _current_call.get().principal


def current_call() -> CallInfo:
    """Actor, peer, user agent and request id of the RPC being handled."""
    return _current_call.get().info()


def load_or_create_secret(settings: Settings) -> str:
    """The HS256 signing secret: from settings, else (embedded mode only) the data directory's, created
    on first use. With DATABASE_URL set, replicas must share a key, so a missing one is a SettingsError."""
    if settings.jwt_secret:
        return settings.jwt_secret
    if not settings.embedded:
        raise SettingsError(
            "PREFD_JWT_SECRET: not set while DATABASE_URL is: every replica of an installation must accept "
            "the others' tokens, so set PREFD_JWT_SECRET (HS256) or PREFD_JWT_PUBLIC_KEY (RS256/ES256) to the "
            "same value on each (only the embedded mode, without DATABASE_URL, creates a secret in the data "
            "directory)"
        )
    path = settings.data_dir / "jwt_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(secrets.token_urlsafe(48))
        tmp.chmod(0o600)
        tmp.replace(path)
    return path.read_text().strip()


class TokenVerifier:
    """Checks bearer tokens (HS256 with a secret, or RS256/ES256 with a public key) and, under mTLS
    when configured, stands a verified client certificate's common name in for a missing token."""

    def __init__(self, settings: Settings) -> None:
        if settings.jwt_public_key:
            key = settings.jwt_public_key
            if not key.lstrip().startswith("-----BEGIN"):
                try:
                    key = Path(key).read_text()
                except (OSError, UnicodeDecodeError) as exc:
                    reason = exc.strerror if isinstance(exc, OSError) else "not a text file"
                    raise SettingsError(f"PREFD_JWT_PUBLIC_KEY: cannot read {key}: {reason or exc}") from exc
            self._key: str = key
            self._algorithms = [settings.jwt_algorithm] if settings.jwt_algorithm != "HS256" else ["RS256", "ES256"]
        else:
            self._key = load_or_create_secret(settings)
            self._algorithms = ["HS256"]
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        # Verified tokens until they expire: a signature check per call costs more than the call.
        self._verified: dict[str, tuple[Principal, float]] = {}
        # Only a server that requires and verifies client certificates lets one stand for a caller.
        self.accepts_certificates = settings.tls_client_subject_as_caller and settings.tls_client_ca_file is not None
        self._certificate_role = Role(settings.tls_client_subject_role)
        self._certificate_roles = {name: Role(role) for name, role in settings.tls_client_subject_roles.items()}
        self._certificate_callers: dict[bytes, Principal] = {}

    def verify(self, token: str) -> Principal:
        """The principal a token names; Unauthenticated if it is invalid or expired."""
        known = self._verified.get(token)
        if known is not None:
            if known[1] > time.time():
                return known[0]
            del self._verified[token]
        principal, expires = self._decode(token)
        if len(self._verified) >= MAX_VERIFIED_TOKENS:
            self._verified.clear()
        self._verified[token] = (principal, expires)
        return principal

    def certificate_caller(self, auth_context: Mapping[str, Iterable[bytes]]) -> Principal:
        """The caller a verified client certificate names (its subject's common name, with the role
        PREFD_TLS_CLIENT_SUBJECT_ROLES gives that name, else PREFD_TLS_CLIENT_SUBJECT_ROLE);
        Unauthenticated without one."""
        names = list(auth_context.get("x509_common_name", ()))
        transport = list(auth_context.get("transport_security_type", ()))
        if not self.accepts_certificates or len(names) != 1 or transport != [b"ssl"]:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        known = self._certificate_callers.get(names[0])
        if known is not None:
            return known
        try:
            name = names[0].decode()
        except UnicodeDecodeError as exc:
            raise Unauthenticated("the client certificate's common name is not UTF-8") from exc
        problem = id_problem(name)
        if problem:
            raise Unauthenticated(f"the client certificate's common name {name[:128]!r} is no caller name: {problem}")
        role = self._certificate_roles.get(name, self._certificate_role)
        principal = Principal(subject=name, org="", roles=frozenset({role}))
        if len(self._certificate_callers) >= MAX_VERIFIED_TOKENS:
            self._certificate_callers.clear()
        self._certificate_callers[names[0]] = principal
        return principal

    def _decode(self, token: str) -> tuple[Principal, float]:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                # The claims' types are checked below, with messages naming the claim.
                options={"require": ["sub", "exp"], "verify_sub": False},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token expired") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from exc
        subject = self._identifier_claim(claims, "sub")
        org = self._identifier_claim(claims, "org") if claims.get("org", "") != "" else ""
        raw_roles = claims.get("roles", [])
        if isinstance(raw_roles, str):
            raw_roles = [raw_roles]
        if not self._is_string_list(raw_roles):
            raise Unauthenticated("invalid token: claim 'roles' must be a string or a list of strings")
        roles = frozenset(Role(r) for r in raw_roles if r in Role._value2member_map_)
        if not roles:
            raise Unauthenticated("token grants no known role (user, service, admin)")
        raw_permissions = claims.get("permissions", [])
        if not self._is_string_list(raw_permissions):
            raise Unauthenticated("invalid token: claim 'permissions' must be a list of strings")
        principal = Principal(subject=subject, org=org, roles=roles, permissions=frozenset(raw_permissions))
        return principal, float(claims["exp"])

    @staticmethod
    def _is_string_list(value: object) -> bool:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)

    @staticmethod
    def _identifier_claim(claims: Mapping[str, Any], name: str) -> str:
        """A claim that names a user, service or org: a string that is a valid id."""
        value = claims.get(name)
        if not isinstance(value, str):
            raise Unauthenticated(f"invalid token: claim {name!r} must be a string")
        problem = id_problem(value)
        if problem:
            raise Unauthenticated(f"invalid token: claim {name!r} {problem}")
        return value


def mint_token(
    secret_or_private_key: str,
    subject: str,
    roles: list[str],
    org: str = "",
    ttl_s: int = 3600,
    algorithm: str = "HS256",
    audience: str | None = None,
    issuer: str | None = None,
    permissions: list[str] | None = None,
) -> str:
    """A signed token for `subject` with `roles` (and extra `permissions`), valid for ttl_s seconds."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "roles": roles, "iat": now, "exp": now + ttl_s}
    if org:
        claims["org"] = org
    if permissions:
        claims["permissions"] = permissions
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret_or_private_key, algorithm=algorithm)


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


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


class Authenticator:
    """Wraps every method of a service once, at registration: request id (from `x-request-id` or
    generated, returned in trailing metadata), bearer token -> Principal for the handler, domain
    errors -> rpc Status, prebuilt bytes responses sent as they are, and per-method call metrics."""

    def __init__(self, verifier: TokenVerifier, metrics: RpcMetrics, call_timeout_s: float | None = None) -> None:
        self._verifier = verifier
        self._metrics = metrics
        # Ceiling of a unary call without a client deadline, and of any one database visit (server.deadline).
        self._call_timeout_s = call_timeout_s or DEFAULT_CALL_TIMEOUT_S

    def add_service(self, server: grpc.aio.Server, add_to_server: Callable[[Any, Any], None], servicer: Any) -> None:
        """Register `servicer` (via its generated add_*_to_server function) with authentication."""
        capture = _HandlerCapture()
        add_to_server(servicer, capture)
        raw: frozenset[str] = getattr(servicer, "RAW_REQUEST_METHODS", frozenset())
        # Every handler receives the request bytes: the size, parse and input limits below run inside
        # the wrapper (after authentication), so a bad request is INVALID_ARGUMENT with the fields named.
        wrapped = {
            name: self._wrap(
                handler if name in raw else _checked_handler(handler, name), f"/{capture.service}/{name}", True
            )
            for name, handler in capture.handlers.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, wrapped),))
        server.add_registered_method_handlers(capture.service, wrapped)

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str, raw_request: bool
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """`raw_request`: the servicer parses the request bytes itself (it caches parses on a hot path)."""
        serializer = _bytes_passthrough(handler.response_serializer)
        observer = self._metrics.method(method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, observer),
                request_deserializer=None if raw_request else handler.request_deserializer,
                response_serializer=serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, observer),
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
        _current_request.set((request_id, method))
        context.set_trailing_metadata((("x-request-id", request_id),))
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if token and scheme.lower() == "bearer":
            principal = self._verifier.verify(token)
        elif not header and self._verifier.accepts_certificates:
            # Under mTLS a call without a token may be made by its verified client certificate.
            principal = self._verifier.certificate_caller(context.auth_context())
        else:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        _current_call.set(_Call(principal, context, request_id))

    def _wrap_unary(
        self, behavior: Callable[..., Awaitable[Any]], method: str, observer: MethodObserver
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

    def _wrap_stream(self, behavior: Callable[..., Any], method: str, observer: MethodObserver) -> Callable[..., Any]:
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


def _checked_handler(handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` taking the request bytes: size limit, parse, then the input limits (server.limits)."""
    parse = handler.request_deserializer
    assert parse is not None

    def request_of(raw: bytes) -> Any:
        return parse_request(raw, parse, method)

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


def parse_request(raw: bytes, parse: Callable[[bytes], Any], method: str) -> Any:
    """A request parsed from its bytes and checked against the input limits; INVALID_ARGUMENT (or
    RESOURCE_EXHAUSTED for size) when it is not acceptable."""
    check_request_size(method, len(raw))
    try:
        request = parse(raw)
    except DecodeError as exc:
        raise invalid("request", f"is not a valid {method} request (malformed or nested too deeply)") from exc
    check_request(request)
    return request


def _finished(method: str, observer: MethodObserver, code: grpc.StatusCode, started: float) -> None:
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
