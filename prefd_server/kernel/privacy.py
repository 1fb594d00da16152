"""The privacy registry: the domains taking part in a user's export and erasure, and pseudonyms."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg

from prefd_server.kernel.model import Subject


def pseudonym_of(key: str, user_id: str) -> str:
    """The stable pseudonym an erased user id is replaced by (a keyed hash; the key stays in the database)."""
    digest = hmac.new(key.encode(), user_id.encode(), hashlib.sha256).hexdigest()
    return f"erased-{digest[:24]}"


def rows_affected(status: str) -> int:
    """Rows affected, from a command status such as 'UPDATE 3'."""
    return int(status.rsplit(" ", 1)[-1])


async def pseudonymise(conn: asyncpg.Connection, statements: Sequence[str], user_id: str, pseudonym: str) -> int:
    """Run statements that put `pseudonym` ($2) where `user_id` ($1) is recorded; returns the rows changed."""
    rows = 0
    for statement in statements:
        rows += rows_affected(await conn.execute(statement, user_id, pseudonym))
    return rows


@dataclass(frozen=True, slots=True)
class ExportPart:
    """What one participant adds to a user's export document.

    `sections` are top-level sections by name (no two participants name the same one); `consent`
    holds the records that are the user's consent, merged into the document's "consent" section.
    """

    sections: Mapping[str, Any]
    consent: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ErasedRows:
    """What one participant's erasure did.

    `deleted` counts the user's records removed, by the name the erasure reports them under
    ("overrides", "ai_configs"); `other` counts every other row removed or pseudonymised.
    """

    deleted: Mapping[str, int] = field(default_factory=dict)
    other: int = 0


class PrivacyParticipant(Protocol):
    """A domain's part in exporting and erasing a user's data."""

    @property
    def name(self) -> str:
        """The domain's name (unique in a registry)."""
        ...

    async def export(self, conn: asyncpg.Connection, subject: Subject) -> ExportPart:
        """The user's data this domain holds, read on `conn` inside the export's snapshot."""
        ...

    async def erase(self, conn: asyncpg.Connection, user_id: str, pseudonym: str) -> ErasedRows:
        """Delete the user's data, or put `pseudonym` where the user id is recorded, on `conn` inside
        the erasure's transaction (lock first what this domain's writers of the user's scope lock).
        Records that must be kept, such as consent evidence, are pseudonymised rather than deleted."""
        ...

    def after_erase(self, user_id: str, xid: int | None) -> None:
        """After the erasure committed (as `xid`; None if there was nothing left to erase): drop what
        this process holds about the user outside PostgreSQL (caches, Redis counters)."""
        ...


class PrivacyRegistry:
    """The participants of export and erasure, in registration order."""

    def __init__(self) -> None:
        self._participants: list[PrivacyParticipant] = []

    def register(self, participant: PrivacyParticipant) -> None:
        """Add a participant; ValueError if one of the same name is registered."""
        if any(p.name == participant.name for p in self._participants):
            raise ValueError(f"privacy participant {participant.name!r} is already registered")
        self._participants.append(participant)

    @property
    def participants(self) -> Sequence[PrivacyParticipant]:
        return tuple(self._participants)

    async def export(self, conn: asyncpg.Connection, subject: Subject) -> list[ExportPart]:
        """Every participant's part of the user's export, read on `conn` (the export's snapshot)."""
        return [await p.export(conn, subject) for p in self._participants]

    async def erase(self, conn: asyncpg.Connection, user_id: str, pseudonym: str) -> list[ErasedRows]:
        """Every participant's erasure of the user, on `conn` (the erasure's transaction)."""
        return [await p.erase(conn, user_id, pseudonym) for p in self._participants]

    def after_erase(self, user_id: str, xid: int | None) -> None:
        """Tell every participant the erasure committed."""
        for participant in self._participants:
            participant.after_erase(user_id, xid)
