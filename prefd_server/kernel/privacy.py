"""Pseudonyms: the stable name an erased user id is replaced by, everywhere it was recorded."""

from __future__ import annotations

import hashlib
import hmac


def pseudonym_of(key: str, user_id: str) -> str:
    """The stable pseudonym an erased user id is replaced by (a keyed hash; the key stays in the database)."""
    digest = hmac.new(key.encode(), user_id.encode(), hashlib.sha256).hexdigest()
    return f"erased-{digest[:24]}"
