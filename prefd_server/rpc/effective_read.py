"""The hot path shared by the raw-bytes GetEffective* reads: memoised parse, permission check, prebuilt body, cursor."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.errors import invalid
from prefd_server.kernel.feed import FeedReader
from prefd_server.kernel.ids import id_problem
from prefd_server.kernel.model import Subject
from prefd_server.kernel.tokens import TokenKey
from prefd_server.rpc.convert import CursorField
from prefd_server.rpc.limits import parse_request
from prefd_server.rpc.principal import Principal, current_principal
from prefd_server.rpc.request_memo import RequestMemo

Q = TypeVar("Q")  # the validated rest of a request beyond its subject (filters, or nothing)
K = TypeVar("K", bound=Hashable)  # the key a prebuilt body is cached under
S = TypeVar("S")  # what a body was built from: handed back to store_response and ceiling

# A validated request: (user_id, org_id as requested, which may be "", the rest).
ParsedRead = tuple[str, str, Q]


class EffectiveRead(Generic[Q, K, S]):
    """One GetEffective* RPC served from request bytes to response bytes.

    A request's bytes seen before map to their validated parse without protobuf work; the
    caller's permission is checked on every call; a prebuilt body cached under `key` is followed
    by the serialized cursor of the current feed position. Only a miss awaits: it builds the body,
    offers it to the cache, and appends the cursor (lowered to `ceiling` when that says so).
    """

    def __init__(
        self,
        *,
        method: str,
        request_type: Any,
        response_type: Any,
        parse: Callable[[Any], ParsedRead[Q]],
        response: Callable[[K], bytes | None],
        build: Callable[[Subject, Q, K], Awaitable[tuple[bytes, S]]],
        store_response: Callable[[K, S, bytes], None],
        feed: FeedReader,
        tokens: TokenKey,
        parsed: RequestMemo[ParsedRead[Q]],
        key: Callable[[str, str, Q, Principal], K] | None = None,
        ceiling: Callable[[S], FeedCursor | None] | None = None,
    ) -> None:
        """Wire one read (every argument is given by name).

        method: the RPC's name, used in errors.
        request_type / response_type: the request and response message classes; requests are parsed
            with FromString under the input limits, the response's `cursor` field follows each body.
        parse: a parsed request -> (user_id, org_id as requested, the rest), validated.
        response: cache key -> prebuilt body, or None.
        build: (subject, rest, key) -> the body (serialized, without cursor) and what it was built from.
        store_response: (key, what it was built from, body) -> offer a new body to the cache.
        feed, tokens: the feed whose position the cursor gives, and the key that signs cursors.
        parsed: where validated parses are remembered by request bytes.
        key: (user_id, org_id, rest, principal) -> the cache key, the org filled from the caller's
            token when the request left it empty; by default the tuple (user_id, org_id, rest).
        ceiling: what a new body was built from -> a bound on its cursor (None: no bound).
        """
        self._method = method
        self._from_string = request_type.FromString
        self._parse = parse
        self._key = key
        self._response = response
        self._build = build
        self._store_response = store_response
        self._feed = feed
        self._cursor_field = CursorField(response_type, tokens)
        self._ceiling = ceiling
        self._parsed = parsed

    async def __call__(self, raw: bytes, context: object = None) -> bytes:
        """The serialized response to serialized request `raw` for the current caller.

        Takes a handler's (request, context) arguments, so a servicer can serve the RPC with this
        object itself (`context` is unused).
        """
        principal = current_principal()
        parsed = self._parsed.get(raw)
        if parsed is None:
            parsed = self._parse_and_remember(raw)
        user_id, requested_org, rest = parsed
        org_id = requested_org or (principal.org if principal.subject == user_id else "")
        if not principal.may_read(user_id, org_id):
            principal.require_read(Subject(user_id, org_id))
        make_key = self._key
        # Without a key function K is (user_id, org_id, rest) itself (no typing.cast: a call per read).
        key: K = (user_id, org_id, rest) if make_key is None else make_key(user_id, org_id, rest, principal)  # type: ignore[assignment]
        body = self._response(key)
        if body is not None:
            # Safe for cached data: the cache drops any body a passed change touched.
            return body + self._cursor_field(self._feed.position)
        return await self._miss(user_id, org_id, requested_org, rest, key)

    async def _miss(self, user_id: str, org_id: str, requested_org: str, rest: Q, key: K) -> bytes:
        if org_id != requested_org:  # the org came from the token's claim, not the validated request
            problem = id_problem(org_id)
            if problem:
                raise invalid("subject.org_id", problem)
        body, built_from = await self._build(Subject(user_id, org_id), rest, key)
        self._store_response(key, built_from, body)
        position = self._feed.position
        if self._ceiling is not None:
            bound = self._ceiling(built_from)
            if bound is not None:
                position = min(position, bound)
        return body + self._cursor_field(position)

    def _parse_and_remember(self, raw: bytes) -> ParsedRead[Q]:
        """Parse and validate request bytes under the input limits; remember the result by its bytes."""
        parsed = self._parse(parse_request(raw, self._from_string, self._method))
        self._parsed.remember(raw, parsed, len(raw))
        return parsed
