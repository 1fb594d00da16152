"""Authentication: bearer tokens (JWT) and verified client certificates -> the Principal of a call."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
import jwt

from prefd_server.kernel.errors import Unauthenticated
from prefd_server.kernel.ids import id_problem
from prefd_server.rpc.principal import Principal, Role
from prefd_server.settings import Settings, SettingsError

MAX_VERIFIED_TOKENS = 10_000


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

    def caller(self, authorization: str, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        """The caller of a call whose `authorization` metadata is this: its bearer token's principal,
        else (under mTLS, without the header) its verified client certificate's; Unauthenticated otherwise."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if token and scheme.lower() == "bearer":
            return self.verify(token)
        if not authorization and self.accepts_certificates:
            # Under mTLS a call without a token may be made by its verified client certificate.
            return self.certificate_caller(context.auth_context())
        raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")

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
