"""The consent ledger: validated grants and withdrawals, and users' current consents served from memory."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import asyncpg

from prefd_server.kernel.bounded_cache import CacheBudget, approximate_size
from prefd_server.kernel.commits import LocalCommits
from prefd_server.kernel.errors import Code, PrefdError, ValidationFailed
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.ids import id_problem
from prefd_server.kernel.model import CallInfo, ChangeKind, FieldViolation, Scope, ScopeKind
from prefd_server.kernel.paging import MAX_PAGE_SIZE
from prefd_server.kernel.scoped_cache import ScopedCache
from prefd_server.notifications import consent_store
from prefd_server.notifications.model import (
    MAX_NAME_LENGTH,
    MAX_PROOF_LENGTH,
    ConsentEntry,
    ConsentStatus,
    LegalBasis,
)

PURPOSE_PATTERN = re.compile(r"[a-z0-9_.-]{1,128}")
# Purposes the ledger always knows, besides those `notifications.consent_purposes` names.
FIXED_PURPOSES = frozenset({"marketing_email", "marketing_sms", "product_updates", "research"})

UserConsents = Mapping[str, ConsentEntry]  # purpose -> its latest entry (shared with the cache: read only)
KnownPurposes = Callable[[], Awaitable[Collection[str]]]


class ConsentNotGranted(PrefdError):
    """A withdrawal of a purpose that is not granted now (never granted, withdrawn or expired)."""

    code = Code.FAILED_PRECONDITION
    reason = "CONSENT_NOT_GRANTED"

    def __init__(self, user_id: str, purpose: str) -> None:
        super().__init__(f"no granted consent for purpose {purpose!r} to withdraw", user_id=user_id, purpose=purpose)


def _text_violations(fields: Mapping[str, tuple[str, int]]) -> list[FieldViolation]:
    return [
        FieldViolation(name, f"must be at most {limit} characters (got {len(value)})")
        for name, (value, limit) in fields.items()
        if len(value) > limit
    ]


def _user_violations(user_id: str) -> list[FieldViolation]:
    problem = id_problem(user_id)
    return [FieldViolation("user_id", problem)] if problem else []


def _purpose_violations(purpose: str) -> list[FieldViolation]:
    if PURPOSE_PATTERN.fullmatch(purpose):
        return []
    return [FieldViolation("purpose", "must be 1-128 characters of [a-z0-9_.-]")]


def _raise_if(violations: Sequence[FieldViolation]) -> None:
    if violations:
        raise ValidationFailed(violations)


def _withdrawal(user_id: str, purpose: str, source: str) -> consent_store.EntryBuilder:
    """The entry withdrawing the purpose's current grant (FAILED_PRECONDITION if there is none)."""

    def build(previous: ConsentEntry | None, now: datetime) -> ConsentEntry:
        if previous is None or previous.status_at(now) is not ConsentStatus.GRANTED:
            raise ConsentNotGranted(user_id, purpose)
        return replace(
            previous,
            status=ConsentStatus.WITHDRAWN,
            source=source,
            proof_reference="",
            withdrawn_at=now,
            entry_id=0,
            recorded_at=None,
        )

    return build


class ConsentLedger:
    """Grants and withdrawals appended with their change rows; current consents cached per user.

    The cache forgets a user on this process's commits of kind CONSENT or ERASURE (listeners added
    here) and on feed events of those kinds (register `on_changes` with the feed reader).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        commits: LocalCommits,
        purposes: KnownPurposes | None = None,
        budget: CacheBudget | None = None,
    ) -> None:
        self._pool = pool
        self._commits = commits
        self._purposes = purposes
        self._cache: ScopedCache[UserConsents] = ScopedCache(
            pool, _read_current, name="consents", budget=budget, sizeof=approximate_size
        )
        commits.add_listener(ChangeKind.CONSENT, self.on_local_commit)
        commits.add_listener(ChangeKind.ERASURE, self.on_local_commit)

    # --- invalidation ------------------------------------------------------------------

    def on_changes(self, events: Sequence[ChangeEvent]) -> None:
        """Feed listener: forget the users consent changes name, and everyone on an erasure."""
        self._cache.on_changes(events, ChangeKind.CONSENT, {})

    def on_local_commit(self, scope: Scope, xid: int) -> None:
        """A consent write or erasure of this process committed: its own reads see it at once."""
        self._cache.forget(scope, xid)

    # --- writes ------------------------------------------------------------------------

    async def grant(
        self,
        user_id: str,
        purpose: str,
        legal_basis: LegalBasis,
        source: str,
        notice_version: str,
        proof_reference: str,
        expires_at: datetime | None,
        call: CallInfo,
    ) -> ConsentEntry:
        """Record a grant (a purpose granted again gets a new entry). INVALID_ARGUMENT for a malformed
        or unknown purpose, an over-long text or an expiry not in the future."""
        violations = _user_violations(user_id) + _purpose_violations(purpose)
        violations += _text_violations(
            {
                "source": (source, MAX_NAME_LENGTH),
                "notice_version": (notice_version, MAX_NAME_LENGTH),
                "proof_reference": (proof_reference, MAX_PROOF_LENGTH),
            }
        )
        if expires_at is not None and (expires_at.tzinfo is None or expires_at <= datetime.now(UTC)):
            violations.append(FieldViolation("expires_at", "must be a time in the future"))
        _raise_if(violations)
        if self._purposes is not None and purpose not in FIXED_PURPOSES and purpose not in await self._purposes():
            raise ValidationFailed([FieldViolation("purpose", f"unknown purpose {purpose!r}")])

        def build(previous: ConsentEntry | None, now: datetime) -> ConsentEntry:
            return ConsentEntry(
                user_id=user_id,
                purpose=purpose,
                legal_basis=legal_basis,
                status=ConsentStatus.GRANTED,
                source=source,
                notice_version=notice_version,
                proof_reference=proof_reference,
                granted_at=now,
                expires_at=expires_at,
            )

        return await self._append(user_id, purpose, build, call)

    async def withdraw(self, user_id: str, purpose: str, source: str, call: CallInfo) -> ConsentEntry:
        """Record a withdrawal of the purpose's current grant. FAILED_PRECONDITION (CONSENT_NOT_GRANTED)
        when the purpose is not granted now; INVALID_ARGUMENT for malformed input."""
        violations = _user_violations(user_id) + _purpose_violations(purpose)
        _raise_if(violations + _text_violations({"source": (source, MAX_NAME_LENGTH)}))
        return await self._append(user_id, purpose, _withdrawal(user_id, purpose, source), call)

    async def _append(
        self, user_id: str, purpose: str, build: consent_store.EntryBuilder, call: CallInfo
    ) -> ConsentEntry:
        entry, xid = await consent_store.append(self._pool, user_id, purpose, build, call)
        self._commits.committed(ChangeKind.CONSENT, Scope(ScopeKind.USER, user_id), xid)
        return entry

    # --- reads -------------------------------------------------------------------------

    async def current(self, user_id: str) -> UserConsents:
        """The user's latest entry per purpose (its recorded status; `status_at` tells expiry)."""
        _raise_if(_user_violations(user_id))
        return (await self.current_many([user_id]))[user_id]

    async def current_many(self, user_ids: Sequence[str]) -> dict[str, UserConsents]:
        """Each user's latest entry per purpose: from memory, else one snapshot for all the missing."""
        scopes = [Scope(ScopeKind.USER, user_id) for user_id in user_ids]
        layers = await self._cache.layers(scopes)
        return {scope.id: layer.value for scope, layer in layers.items()}

    async def history(self, user_id: str, purpose: str, after_id: int, limit: int) -> list[ConsentEntry]:
        """Up to `limit` (1-1000) of the user's entries after `after_id`, oldest first; purpose "" = all."""
        violations = _user_violations(user_id) + (_purpose_violations(purpose) if purpose else [])
        if not 1 <= limit <= MAX_PAGE_SIZE:
            violations.append(FieldViolation("page_size", f"must be 1-{MAX_PAGE_SIZE}"))
        _raise_if(violations)
        return await consent_store.history(self._pool, user_id, purpose or None, max(after_id, 0), limit)


async def _read_current(conn: asyncpg.Connection, scopes: Sequence[Scope]) -> dict[Scope, UserConsents]:
    by_user = await consent_store.current(conn, [scope.id for scope in scopes])
    return {scope: by_user[scope.id] for scope in scopes}
