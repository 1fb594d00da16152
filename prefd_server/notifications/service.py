"""prefd.v1.NotificationService: decisions (settings and consents from memory, throttles charged once) and consents."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeAlias

import grpc

from prefd.v1 import notifications_pb2, notifications_pb2_grpc
from prefd_server.kernel.errors import PermissionDenied, invalid
from prefd_server.kernel.ids import id_problem
from prefd_server.kernel.model import Subject
from prefd_server.kernel.paging import paginate, parse_int64
from prefd_server.kernel.parts import EffectiveValues, Kernel
from prefd_server.notifications import convert
from prefd_server.notifications.consents import ConsentLedger, UserConsents
from prefd_server.notifications.decision_memo import DecisionMemo, valid_until_s
from prefd_server.notifications.model import Event
from prefd_server.notifications.rules import evaluate
from prefd_server.notifications.throttle import Throttles
from prefd_server.rpc.convert import CursorField, subject_from_pb
from prefd_server.rpc.limits import parse_request
from prefd_server.rpc.principal import Principal, current_call, current_principal
from prefd_server.rpc.request_memo import RequestMemo

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

# The settings a decision reads: every notification setting and the user's timezone.
SETTING_PREFIXES = ("notifications.", "locale.timezone")

# A validated Decide request: the subject as asked (org may be ""), the event (`at` as asked, else a
# placeholder: now is used whenever a decision is made), whether `at` was given, consume, the idempotency key.
_Question = tuple[Subject, Event, bool, bool, str]
# A prepared answer: the evaluation on the wire, and the whole response body (without cursor) when no
# throttle applies (else it is finished per call with the throttle's verdict).
_Prepared = tuple[convert.WireDecision, bytes | None]


def _with_org(subject: Subject, org_id: str) -> Subject:
    """`subject` in the caller's org (from its token, so checked like a requested one)."""
    problem = id_problem(org_id)
    if problem:
        raise invalid("subject.org_id", problem)
    return Subject(subject.user_id, org_id)


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

    # Decide parses its own request bytes, remembering parses of requests seen before.
    RAW_REQUEST_METHODS = frozenset({"Decide"})

    def __init__(
        self,
        kernel: Kernel,
        settings: EffectiveValues,
        ledger: ConsentLedger,
        throttles: Throttles,
        memo: DecisionMemo[_Prepared],
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._throttles = throttles
        self._memo = memo
        self._feed = kernel.feed
        self._tokens = kernel.tokens
        self._questions: RequestMemo[_Question] = RequestMemo("notifications.requests", kernel.caches)
        self._cursor_field = CursorField(notifications_pb2.DecideResponse, kernel.tokens)
        self._batch_cursor_field = CursorField(notifications_pb2.DecideBatchResponse, kernel.tokens)

    # --- decisions -----------------------------------------------------------------------

    async def Decide(self, raw: bytes, context: Context) -> bytes:  # type: ignore[override]  # raw bytes in and out
        """Served from request bytes (RAW_REQUEST_METHODS): a question asked before is answered from the
        memo while nothing it read has changed, with at most the throttle's one round trip."""
        principal = current_principal()
        question = self._questions.get(raw)
        if question is None:
            question = self._parse_decide(raw)
        requested, event, at_given, consume, key = question
        org_id = requested.org_id or (principal.org if principal.subject == requested.user_id else "")
        if not principal.may_read(requested.user_id, org_id):
            principal.require_read(Subject(requested.user_id, org_id))
        now_s = time.time()
        if at_given:
            convert.check_event_at(event.at, datetime.fromtimestamp(now_s, UTC))
        subject = requested if org_id == requested.org_id else _with_org(requested, org_id)
        memo_key = self._memo.key(subject, event, at_given)  # without `at`, the event's time is not read
        prepared = self._memo.get(memo_key, now_s) if memo_key is not None else None
        position = self._feed.position
        if prepared is not None and prepared[1] is not None:
            return prepared[1] + self._cursor_field(position)
        now = datetime.fromtimestamp(now_s, UTC)
        at = event.at if at_given else now
        if prepared is None:
            prepared = await self._prepare(subject, replace(event, at=at), at_given, now)
        wire, body = prepared
        if body is None:
            body = convert.decide_response(await self._throttled(wire, subject, at, consume, key))
        return body + self._cursor_field(position)

    def _parse_decide(self, raw: bytes) -> _Question:
        request = parse_request(raw, notifications_pb2.DecideRequest.FromString, "Decide")
        subject = subject_from_pb(request.subject, "subject")
        event = convert.event_from_pb(request.event, datetime.now(UTC))
        question = (
            subject,
            event,
            request.event.HasField("at"),
            request.consume,
            convert.idempotency_key_from_pb(request.idempotency_key),
        )
        self._questions.remember(raw, question, 2 * len(raw))
        return question

    async def _prepare(self, subject: Subject, event: Event, at_given: bool, now: datetime) -> _Prepared:
        """A decision made afresh (settings and consents from memory), remembered unless it depends on more
        than the memo can see."""
        tick = self._memo.tick
        (wire,) = await self._wire([subject], event, now)
        evaluation = wire.evaluation
        body = None if evaluation.throttle is not None else convert.decide_response(wire.decision(subject))
        schedule = evaluation.schedule_changes_at if not at_given else None
        until_s = valid_until_s(*(i.timestamp() for i in (schedule, evaluation.consent_changes_at) if i is not None))
        prepared = (wire, body)
        size = wire.cost + (len(body) if body is not None else 0)
        self._memo.put(subject, event, at_given, evaluation.condition_paths, (prepared, size, until_s), tick)
        return prepared

    async def DecideBatch(  # type: ignore[override]  # a prebuilt body out
        self, request: notifications_pb2.DecideBatchRequest, context: Context
    ) -> bytes:
        principal = current_principal()
        if not request.subjects:
            raise invalid("subjects", "name at least one recipient")
        subjects = [subject_from_pb(s, f"subjects[{i}]") for i, s in enumerate(request.subjects)]
        for subject in subjects:
            principal.require_read(subject)
        event = convert.event_from_pb(request.event, datetime.now(UTC))
        key = convert.idempotency_key_from_pb(request.idempotency_key)
        position = self._feed.position
        wires = await self._wire(subjects, event, datetime.now(UTC))
        decisions = await asyncio.gather(
            *(
                self._throttled(wire, subject, event.at, request.consume, f"{key}:{subject.user_id}" if key else "")
                for wire, subject in zip(wires, subjects, strict=True)
            )
        )
        return convert.decide_batch_response(decisions) + self._batch_cursor_field(position)

    async def _wire(self, subjects: Sequence[Subject], event: Event, now: datetime) -> list[convert.WireDecision]:
        """Each subject's evaluation, on the wire but for the subject and throttle: settings and consents
        from memory; recipients whose settings and consents come from the same stored values (an org's
        users without overrides of their own) share one evaluation."""
        resolved = await self._settings.resolve_shared(subjects, SETTING_PREFIXES, ())
        consents = await self._ledger.current_many([s.user_id for s in subjects])
        shared: dict[Hashable, convert.WireDecision] = {}
        wires = []
        for subject, (basis, values) in zip(subjects, resolved, strict=True):
            mine = consents.get(subject.user_id, {})
            group = (basis, tuple(sorted((purpose, entry.entry_id) for purpose, entry in mine.items())))
            wire = shared.get(group)
            if wire is None:
                evaluation = evaluate(subject, event, {v.key: v for v in values}, mine, now)
                wire = shared[group] = convert.WireDecision(evaluation)
            wires.append(wire)
        return wires

    async def _throttled(
        self, wire: convert.WireDecision, subject: Subject, at: datetime, consume: bool, key: str
    ) -> bytes:
        """The subject's serialized decision, with the throttle charged (consume) or read when one applies."""
        evaluation = wire.evaluation
        rule = evaluation.throttle
        if rule is None:
            return wire.decision(subject)
        if consume and evaluation.needs_throttle:
            allowed, state = await self._throttles.charge(subject.user_id, evaluation.event.event_type, rule, at, key)
            return wire.decision(subject, allowed, state)
        state = await self._throttles.peek(subject.user_id, evaluation.event.event_type, rule, at)
        return wire.decision(subject, state.remaining > 0, state)

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
