"""Opaque tokens handed to clients (feed cursors, page tokens): sealed with a key every replica of
one installation derives from the same database-held secret, so a client can neither forge nor edit
one, and a replica accepts what another issued."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

# Longest token accepted before any work is done on it (characters).
MAX_TOKEN_LENGTH = 1024
_MAC_BYTES = 16


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    """Strict base64url: any character outside the alphabet is an error, never skipped, and only the one
    canonical spelling of given bytes is accepted (unused trailing bits must be zero), so a token cannot
    be respelled."""
    raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    if _b64(raw) != text:
        raise ValueError("not the canonical spelling")
    return raw


@dataclass(frozen=True, slots=True)
class TokenKey:
    """Seals and opens this installation's tokens."""

    installation: str
    secret: bytes

    @classmethod
    def derive(cls, installation: str, installation_secret: str) -> TokenKey:
        """The token key of an installation, derived from its stored secret (separate from other uses)."""
        secret = hmac.new(installation_secret.encode(), b"prefd token key v1", hashlib.sha256).digest()
        return cls(installation, secret)

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self.secret, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def seal(self, payload: str) -> str:
        """`payload` as an opaque token: base64url(payload) "." base64url(mac)."""
        raw = payload.encode()
        return f"{_b64(raw)}.{_b64(self._mac(raw))}"

    def open(self, token: str) -> str | None:
        """The payload of a token this installation sealed; None if it is malformed, edited or foreign."""
        if not token or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            return None
        body, dot, mac = token.partition(".")
        if not dot:
            return None
        try:
            raw, tag = _unb64(body), _unb64(mac)
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(tag, self._mac(raw)):
            return None
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return None
