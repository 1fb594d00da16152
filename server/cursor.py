"""FeedCursor: an opaque, installation-bound position in the change feed."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

_PREFIX = "c1"


@dataclass(frozen=True, order=True, slots=True)
class FeedCursor:
    """Everything at or before (xid, change_id) has been seen; order is (xid, change_id)."""

    xid: int
    change_id: int

    @classmethod
    def at_horizon(cls, xmin: int) -> FeedCursor:
        """The cursor of a snapshot whose oldest running transaction is `xmin`."""
        return cls(xmin, 0)

    def encode(self, installation: str) -> str:
        """The opaque token handed to clients."""
        raw = f"{_PREFIX}.{installation}.{self.xid}.{self.change_id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str, installation: str) -> FeedCursor:
        """Parse a token; ValueError if it is malformed or from another installation."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ValueError("malformed cursor") from exc
        parts = raw.split(".")
        if len(parts) != 4 or parts[0] != _PREFIX:
            raise ValueError("malformed cursor")
        if parts[1] != installation:
            raise ValueError("cursor belongs to another prefd installation")
        try:
            xid, change_id = int(parts[2]), int(parts[3])
        except ValueError as exc:
            raise ValueError("malformed cursor") from exc
        if xid < 0 or change_id < 0:
            raise ValueError("malformed cursor")
        return cls(xid, change_id)
