"""FeedCursor: an opaque, sealed, installation-bound position in the change feed."""

from __future__ import annotations

import re
from dataclasses import dataclass

from prefd_server.kernel.tokens import TokenKey

_PREFIX = "c2"
# xid8 values and change ids as the feed stores them (bigint): decimal digits, no sign, no padding.
_POSITION = re.compile(r"(0|[1-9][0-9]{0,18})")
INT64_MAX = 2**63 - 1


def _position(text: str) -> int:
    if not _POSITION.fullmatch(text):
        raise ValueError("malformed cursor")
    value = int(text)
    if value > INT64_MAX:
        raise ValueError("malformed cursor")
    return value


@dataclass(frozen=True, order=True, slots=True)
class FeedCursor:
    """Everything at or before (xid, change_id) has been seen; order is (xid, change_id)."""

    xid: int
    change_id: int

    @classmethod
    def at_horizon(cls, xmin: int) -> FeedCursor:
        """The cursor of a snapshot whose oldest running transaction is `xmin`."""
        return cls(xmin, 0)

    def encode(self, key: TokenKey) -> str:
        """The opaque token handed to clients."""
        return key.seal(f"{_PREFIX}.{key.installation}.{self.xid}.{self.change_id}")

    @classmethod
    def decode(cls, token: str, key: TokenKey) -> FeedCursor:
        """Parse a token; ValueError if it is malformed, edited or from another installation."""
        payload = key.open(token)
        if payload is None:
            raise ValueError("is not a cursor this prefd installation issued")
        parts = payload.split(".")
        if len(parts) != 4 or parts[0] != _PREFIX or parts[1] != key.installation:
            raise ValueError("is not a cursor this prefd installation issued")
        return cls(_position(parts[2]), _position(parts[3]))
