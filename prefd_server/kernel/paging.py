"""Opaque keyset page tokens, sealed by the installation's token key and bound to the query that
produced them."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from prefd_server.kernel.errors import invalid
from prefd_server.kernel.tokens import TokenKey

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_INT64 = re.compile(r"(0|[1-9][0-9]{0,18})")
INT64_MAX = 2**63 - 1
T = TypeVar("T")


def page_size(requested: int) -> int:
    """The page size to use for a requested one (0 = default); negative is invalid."""
    if requested < 0:
        raise invalid("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _fingerprint(query: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()[:16]


def encode_token(query: dict[str, Any], after: str, tokens: TokenKey) -> str:
    """A token meaning "the same query, after this sort key"."""
    return tokens.seal(json.dumps({"q": _fingerprint(query), "after": after}, separators=(",", ":")))


def decode_token(token: str, query: dict[str, Any], tokens: TokenKey) -> str | None:
    """The sort key to resume after; None for the first page. INVALID_ARGUMENT if the token was not
    issued by this installation, was edited, or belongs to another query."""
    if not token:
        return None
    payload = tokens.open(token)
    if payload is None:
        raise invalid("page_token", "is not a page token this server issued; start again without one")
    try:
        raw = json.loads(payload)
        fingerprint, after = raw["q"], raw["after"]
    except (ValueError, KeyError, TypeError) as exc:
        raise invalid("page_token", "is malformed") from exc
    if fingerprint != _fingerprint(query) or not isinstance(after, str):
        raise invalid("page_token", "belongs to another query; start again without a page_token")
    return after


def parse_int64(text: str, field: str = "page_token") -> int:
    """A non-negative int64 written by this server in a token; INVALID_ARGUMENT otherwise."""
    if not _INT64.fullmatch(text) or int(text) > INT64_MAX:
        raise invalid(field, "is malformed")
    return int(text)


@dataclass(frozen=True, slots=True)
class PageRequest:
    """One keyset page to read: `limit` rows after `after` (None: from the start)."""

    size: int
    after: str | None
    query: dict[str, Any]
    tokens: TokenKey

    @property
    def limit(self) -> int:
        """How many rows to fetch: one more than the page, to know whether another page follows."""
        return self.size + 1

    def cut(self, found: Sequence[T], sort_key: Callable[[T], str]) -> tuple[list[T], str]:
        """The page's rows and the token of the next page ("" after the last one)."""
        rows = list(found[: self.size])
        if len(found) <= self.size:
            return rows, ""
        return rows, encode_token(self.query, sort_key(rows[-1]), self.tokens)


def paginate(query: dict[str, Any], requested_size: int, page_token: str, tokens: TokenKey) -> PageRequest:
    """Check a listing's page_size and page_token against its query; INVALID_ARGUMENT if either is bad."""
    size = page_size(requested_size)
    return PageRequest(size, decode_token(page_token, query, tokens), query, tokens)
