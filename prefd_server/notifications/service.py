"""prefd.v1.NotificationService: decisions (settings and consents from memory, throttles charged once) and consents."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeAlias

import grpc

from prefd.v1 import notifications_pb2, notifications_pb2_grpc
from prefd_server.kernel.errors import PermissionDenied, invalid
from prefd_server.kernel.model import ResolvedValue, Subject
from prefd_server.kernel.paging import paginate, parse_int64
from prefd_server.kernel.parts import EffectiveValues, Kernel
from prefd_server.notifications import convert
from prefd_server.notifications.consents import ConsentLedger, UserConsents
from prefd_server.notifications.model import Decision, Event, ThrottleState
from prefd_server.notifications.rules import Evaluation, evaluate, finish, for_subject
from prefd_server.notifications.throttle import Throttles
from prefd_server.rpc.convert import cursor_to_pb, subject_from_pb
from prefd_server.rpc.principal import Principal, current_call, current_principal

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

# The settings a decision reads: every notification setting and the user's timezone.
SETTING_PREFIXES = ("notifications.", "locale.timezone")


def _require_own_or_admin(principal: Principal, user_id: str, source: str) -> None:
    """Consents are recorded by the user itself, or by an admin on its behalf naming the source."""
    if principal.subject == user_id and not principal.reads_any:
        return
    principal.require_admin("record another user's consent")
    if not source:
        raise invalid("source", "must say where the consent was given when recorded on a user's behalf")


class NotificationService(notifications_pb2_grpc.NotificationServiceServicer):
    """Whether, where and when to notify; the consent ledger."""

    SERVICE_NAME: str = notifications_pb2.DESCRIPTOR.services_by_name["NotificationService"].full_name
    add_to_server = staticmethod(notifications_pb2_grpc.add_NotificationServiceServicer_to_server)

    def __init__(self, kernel: Kernel, settings: EffectiveValues, ledger: ConsentLedger, throttles: Throttles) -> None:
        self._settings = settings
        self._ledger = ledger
        self._throttles = throttles
        self._feed = kernel.feed
        self._tokens = kernel.tokens

    # --- decisions -----------------------------------------------------------------------

    async def Decide(
        self, request: notifications_pb2.DecideRequest, context: Context
    ) -> notifications_pb2.DecideResponse:
        principal = current_principal()
        subject = subject_from_pb(
            request.subject, "subject", principal.org if principal.subject == request.subject.user_id else ""
        )
        principal.require_read(subject)
        event = convert.event_from_pb(request.event, datetime.now(UTC))
        key = convert.idempotency_key_from_pb(request.idempotency_key)
        cursor = self._feed.position
        (decision,) = await self._decide([subject], event, request.consume, [key])
        return notifications_pb2.DecideResponse(
            decision=convert.decision_to_pb(decision), cursor=cursor_to_pb(cursor, self._tokens)
        )

    async def DecideBatch(
        self, request: notifications_pb2.DecideBatchRequest, context: Context
    ) -> notifications_pb2.DecideBatchResponse:
        principal = current_principal()
        if not request.subjects:
            raise invalid("subjects", "name at least one recipient")
        subjects = [subject_from_pb(s, f"subjects[{i}]") for i, s in enumerate(request.subjects)]
        for subject in subjects:
            principal.require_read(subject)
        event = convert.event_from_pb(request.event, datetime.now(UTC))
        key = convert.idempotency_key_from_pb(request.idempotency_key)
        keys = [f"{key}:{s.user_id}" if key else "" for s in subjects]
        cursor = self._feed.position
        decisions = await self._decide(subjects, event, request.consume, keys)
        return notifications_pb2.DecideBatchResponse(
            decisions=[convert.decision_to_pb(d) for d in decisions], cursor=cursor_to_pb(cursor, self._tokens)
        )

    async def _decide(
        self, subjects: Sequence[Subject], event: Event, consume: bool, keys: Sequence[str]
    ) -> list[Decision]:
        """Settings and consents for every subject from memory, the rules, then each throttle once."""
        now = datetime.now(UTC)
        resolved = await self._settings.resolve(subjects, SETTING_PREFIXES, ())
        consents = await self._ledger.current_many([s.user_id for s in subjects])
        # Recipients whose settings and consents come from the same stored values (an org's users
        # without overrides of their own) share one evaluation; only the subject and digest keys differ.
        shared: dict[tuple[Any, ...], Evaluation] = {}
        evaluations = []
        for subject, values in zip(subjects, resolved, strict=True):
            mine = consents.get(subject.user_id, {})
            basis = _basis(values, mine)
            evaluation = shared.get(basis)
            if evaluation is None:
                evaluation = shared[basis] = evaluate(subject, event, _by_key(values), mine, now)
            evaluations.append(for_subject(evaluation, subject))
        return list(
            await asyncio.gather(*(self._throttled(e, consume, k) for e, k in zip(evaluations, keys, strict=True)))
        )

    async def _throttled(self, evaluation: Evaluation, consume: bool, key: str) -> Decision:
        rule = evaluation.throttle
        if rule is None:
            return finish(evaluation, True, ThrottleState())
        user_id, event = evaluation.subject.user_id, evaluation.event
        if consume and evaluation.needs_throttle:
            allowed, state = await self._throttles.charge(user_id, event.event_type, rule, event.at, key)
            return finish(evaluation, allowed, state)
        state = await self._throttles.peek(user_id, event.event_type, rule, event.at)
        return finish(evaluation, state.remaining > 0, state)

    # --- consents ------------------------------------------------------------------------

    async def GrantConsent(
        self, request: notifications_pb2.GrantConsentRequest, context: Context
    ) -> notifications_pb2.GrantConsentResponse:
        _require_own_or_admin(current_principal(), request.user_id, request.source)
        basis = convert.legal_basis_from_pb(request.legal_basis)
        expires_at = request.expires_at.ToDatetime(tzinfo=UTC) if request.HasField("expires_at") else None
        entry = await self._ledger.grant(
            request.user_id,
            request.purpose,
            basis,
            request.source,
            request.notice_version,
            request.proof_reference,
            expires_at,
            current_call(),
        )
        return notifications_pb2.GrantConsentResponse(consent=convert.consent_to_pb(entry))

    async def WithdrawConsent(
        self, request: notifications_pb2.WithdrawConsentRequest, context: Context
    ) -> notifications_pb2.WithdrawConsentResponse:
        _require_own_or_admin(current_principal(), request.user_id, request.source)
        entry = await self._ledger.withdraw(request.user_id, request.purpose, request.source, current_call())
        return notifications_pb2.WithdrawConsentResponse(consent=convert.consent_to_pb(entry))

    async def ListConsents(
        self, request: notifications_pb2.ListConsentsRequest, context: Context
    ) -> notifications_pb2.ListConsentsResponse:
        _require_reader(current_principal(), request.user_id)
        current: UserConsents = await self._ledger.current(request.user_id)
        now = datetime.now(UTC)
        return notifications_pb2.ListConsentsResponse(
            consents=[convert.consent_to_pb(current[p], now) for p in sorted(current)]
        )

    async def ListConsentHistory(
        self, request: notifications_pb2.ListConsentHistoryRequest, context: Context
    ) -> notifications_pb2.ListConsentHistoryResponse:
        _require_reader(current_principal(), request.user_id)
        query = {"rpc": "ListConsentHistory", "user": request.user_id, "purpose": request.purpose}
        page = paginate(query, request.page_size, request.page_token, self._tokens)
        after = parse_int64(page.after) if page.after is not None else 0
        found = await self._ledger.history(request.user_id, request.purpose, after, page.limit)
        entries, next_token = page.cut(found, lambda e: str(e.entry_id))
        return notifications_pb2.ListConsentHistoryResponse(
            entries=[convert.consent_to_pb(e) for e in entries], next_page_token=next_token
        )


def _require_reader(principal: Principal, user_id: str) -> None:
    """A user reads its own consents; services and admins anyone's."""
    if principal.reads_any or principal.subject == user_id:
        return
    raise PermissionDenied(f"{principal.subject} may not read the consents of {user_id}", action="read")


def _basis(values: Sequence[ResolvedValue], consents: UserConsents) -> tuple[Any, ...]:
    """What an evaluation depends on besides the event: each setting's source, and each consent entry."""
    settings = tuple((v.key, v.layer, v.scope, v.version) for v in values)
    return settings, tuple(sorted((purpose, entry.entry_id) for purpose, entry in consents.items()))


def _by_key(values: Sequence[ResolvedValue]) -> dict[str, ResolvedValue]:
    return {value.key: value for value in values}
