"""Opaque keyset page tokens bound to the query that produced them."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from server.errors import invalid

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    """The page size to use for a requested one (0 = default); negative is invalid."""
    if requested < 0:
        raise invalid("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _fingerprint(query: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()[:16]


def encode_token(query: dict[str, Any], after: str) -> str:
    """A token meaning "the same query, after this sort key"."""
    raw = json.dumps({"q": _fingerprint(query), "after": after}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(token: str, query: dict[str, Any]) -> str | None:
    """The sort key to resume after; None for the first page. INVALID_ARGUMENT if foreign."""
    if not token:
        return None
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        fingerprint, after = raw["q"], raw["after"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise invalid("page_token", "is malformed") from exc
    if fingerprint != _fingerprint(query) or not isinstance(after, str):
        raise invalid("page_token", "belongs to another query; start again without a page_token")
    return after
