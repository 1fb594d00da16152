"""Between prefd.v1 notification messages and the notification domain's types (the only protobuf here)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import json_format

from prefd.v1 import common_pb2, notifications_pb2
from prefd_server.kernel.errors import ValidationFailed, invalid
from prefd_server.kernel.model import FieldViolation, Subject
from prefd_server.notifications.model import (
    ALL_CHANNELS,
    MAX_NAME_LENGTH,
    Action,
    Channel,
    ChannelDecision,
    ConsentEntry,
    ConsentStatus,
    Decision,
    Event,
    LegalBasis,
    Priority,
    ThrottleState,
    TraceStep,
)
from prefd_server.notifications.rules import Evaluation, throttle_step
from prefd_server.notifications.schedule import digest_key
from prefd_server.rpc import wire
from prefd_server.rpc.convert import provenance_to_pb, subject_to_pb, timestamp

# How far from now an event's `at` may be.
MAX_EVENT_OFFSET = timedelta(days=366)

CHANNELS = {
    notifications_pb2.CHANNEL_EMAIL: Channel.EMAIL,
    notifications_pb2.CHANNEL_SMS: Channel.SMS,
    notifications_pb2.CHANNEL_PUSH: Channel.PUSH,
    notifications_pb2.CHANNEL_IN_APP: Channel.IN_APP,
    notifications_pb2.CHANNEL_WEBHOOK: Channel.WEBHOOK,
    notifications_pb2.CHANNEL_VOICE: Channel.VOICE,
}
CHANNELS_PB = {channel: number for number, channel in CHANNELS.items()}
PRIORITIES = {
    notifications_pb2.PRIORITY_LOW: Priority.LOW,
    notifications_pb2.PRIORITY_MEDIUM: Priority.MEDIUM,
    notifications_pb2.PRIORITY_HIGH: Priority.HIGH,
    notifications_pb2.PRIORITY_CRITICAL: Priority.CRITICAL,
}
PRIORITIES_PB = {priority: number for number, priority in PRIORITIES.items()}
LEGAL_BASES = {
    notifications_pb2.LEGAL_BASIS_CONSENT: LegalBasis.CONSENT,
    notifications_pb2.LEGAL_BASIS_CONTRACT: LegalBasis.CONTRACT,
    notifications_pb2.LEGAL_BASIS_LEGAL_OBLIGATION: LegalBasis.LEGAL_OBLIGATION,
    notifications_pb2.LEGAL_BASIS_VITAL_INTERESTS: LegalBasis.VITAL_INTERESTS,
    notifications_pb2.LEGAL_BASIS_PUBLIC_TASK: LegalBasis.PUBLIC_TASK,
    notifications_pb2.LEGAL_BASIS_LEGITIMATE_INTERESTS: LegalBasis.LEGITIMATE_INTERESTS,
}
LEGAL_BASES_PB = {basis: number for number, basis in LEGAL_BASES.items()}
CONSENT_STATUSES_PB = {
    ConsentStatus.GRANTED: notifications_pb2.CONSENT_STATUS_GRANTED,
    ConsentStatus.WITHDRAWN: notifications_pb2.CONSENT_STATUS_WITHDRAWN,
    ConsentStatus.EXPIRED: notifications_pb2.CONSENT_STATUS_EXPIRED,
}


def _name_problem(value: str) -> str | None:
    if not value:
        return "must not be empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters"
    return None


def event_from_pb(message: notifications_pb2.Event, now: datetime, field: str = "event") -> Event:
    """A validated Event: names present and bounded, known priority and channels, `at` within a year."""
    violations = []
    for name in ("event_type", "category"):
        problem = _name_problem(getattr(message, name))
        if problem:
            violations.append(FieldViolation(f"{field}.{name}", problem))
    priority = None
    if message.priority != notifications_pb2.PRIORITY_UNSPECIFIED:
        priority = PRIORITIES.get(message.priority)
        if priority is None:
            violations.append(FieldViolation(f"{field}.priority", "must be LOW, MEDIUM, HIGH or CRITICAL"))
    channels: list[Channel] = []
    for i, number in enumerate(message.channels):
        channel = CHANNELS.get(number)
        if channel is None:
            violations.append(FieldViolation(f"{field}.channels[{i}]", "must be a known channel"))
        elif channel in channels:
            violations.append(FieldViolation(f"{field}.channels[{i}]", f"{channel} appears more than once"))
        else:
            channels.append(channel)
    at = now
    if message.HasField("at"):
        at = message.at.ToDatetime(tzinfo=UTC)
        if abs(at - now) > MAX_EVENT_OFFSET:
            violations.append(FieldViolation(f"{field}.at", "must be within a year of now"))
    if violations:
        raise ValidationFailed(violations)
    data = json_format.MessageToDict(message.data) if message.HasField("data") else {}
    return Event(
        event_type=message.event_type,
        category=message.category,
        priority=priority,
        data=data,
        at=at,
        channels=tuple(channels) or ALL_CHANNELS,
    )


def check_event_at(at: datetime, now: datetime, field: str = "event.at") -> None:
    """INVALID_ARGUMENT unless `at` is within a year of `now` (checked again at each call of a remembered request)."""
    if abs(at - now) > MAX_EVENT_OFFSET:
        raise invalid(field, "must be within a year of now")


def idempotency_key_from_pb(key: str, field: str = "idempotency_key") -> str:
    """The key, at most 128 characters ("" for none)."""
    if len(key) > MAX_NAME_LENGTH:
        raise invalid(field, f"must be at most {MAX_NAME_LENGTH} characters")
    return key


# One answer's provenance messages by source (the same setting decides several channels' steps).
_Provenances = dict[int, Any]


def _trace_to_pb(steps: Sequence[TraceStep], provenances: _Provenances) -> list[notifications_pb2.TraceStep]:
    found = []
    for step in steps:
        provenance = None
        if step.source is not None:
            provenance = provenances.get(id(step.source))
            if provenance is None:
                provenance = provenances[id(step.source)] = provenance_to_pb(step.source)
        found.append(
            notifications_pb2.TraceStep(rule=step.rule, key=step.key, provenance=provenance, outcome=step.outcome)
        )
    return found


def _channel_to_pb(decision: ChannelDecision, provenances: _Provenances) -> notifications_pb2.ChannelDecision:
    return notifications_pb2.ChannelDecision(
        channel=CHANNELS_PB[decision.channel],
        action=notifications_pb2.Action.Value(f"ACTION_{decision.action.value}"),
        reason=notifications_pb2.Reason.Value(f"REASON_{decision.reason.value}"),
        deliver_after=timestamp(decision.deliver_after),
        digest_key=decision.digest_key,
        trace=_trace_to_pb(decision.trace, provenances),
    )


def _throttle_to_pb(state: ThrottleState) -> notifications_pb2.ThrottleState:
    return notifications_pb2.ThrottleState(
        limit=state.limit, remaining=state.remaining, resets_at=timestamp(state.resets_at), store=state.store
    )


def decision_to_pb(decision: Decision) -> notifications_pb2.Decision:
    """One recipient's answer, message by message (WireDecision builds the same answer in pieces)."""
    provenances: _Provenances = {}  # the sources live as long as `decision`, so their ids stay theirs
    return notifications_pb2.Decision(
        subject=subject_to_pb(decision.subject),
        channels=[_channel_to_pb(c, provenances) for c in decision.channels],
        throttle=_throttle_to_pb(decision.throttle),
        trace=_trace_to_pb(decision.trace, provenances),
        priority=PRIORITIES_PB[decision.priority],
    )


# ChannelDecision's action and reason (fields 2 and 3, varints) as a throttle refusal: appended to a
# channel's bytes they replace its SEND_NOW (the last value of a scalar field wins when parsed).
_THROTTLED = b"".join(
    wire.varint(v) for v in (2 << 3, notifications_pb2.ACTION_SUPPRESS, 3 << 3, notifications_pb2.REASON_THROTTLED)
)


class WireDecision:
    """One evaluation's answer on the wire, in pieces: a subject and a throttle verdict finish it with a few
    concatenations (protobuf merges a message's fields however they are split), so an answer shared by many
    recipients, or by many calls, is converted once. Equal, once parsed, to decision_to_pb(finish(...))."""

    __slots__ = ("_category", "_channels", "_evaluation", "_last_subject", "_source", "_tail", "cost")

    def __init__(self, evaluation: Evaluation) -> None:
        self._evaluation = evaluation
        self._category = evaluation.event.category
        provenances: _Provenances = {}
        # Per channel: its bytes without a digest key, whether the throttle step joins it, its digest slot.
        self._channels = [
            (
                _channel_to_pb(replace(c, digest_key=""), provenances).SerializeToString(),
                c.action is Action.SEND_NOW,
                c.deliver_after if c.action is Action.DIGEST else None,
            )
            for c in evaluation.channels
        ]
        self._tail = notifications_pb2.Decision(
            trace=_trace_to_pb(evaluation.trace, provenances), priority=PRIORITIES_PB[evaluation.priority]
        ).SerializeToString()
        source = evaluation.rules_source
        self._source = wire.field(3, provenance_to_pb(source).SerializeToString()) if source is not None else b""
        self._last_subject: tuple[Subject, bytes] | None = None  # a remembered answer is asked for one subject
        self.cost = len(self._tail) + sum(len(c[0]) for c in self._channels) + len(self._source)

    @property
    def evaluation(self) -> Evaluation:
        return self._evaluation

    def decision(self, subject: Subject, throttle_allowed: bool = True, state: ThrottleState | None = None) -> bytes:
        """The serialized Decision for `subject` (one the evaluation was made for, or shares its basis) with
        the throttle's verdict and state (ignored when the evaluation has no throttle)."""
        if state is None or self._evaluation.throttle is None:
            state = ThrottleState()
        step = throttle_step(self._evaluation, throttle_allowed, state)
        last = self._last_subject
        if last is None or last[0] != subject:
            last = self._last_subject = (subject, wire.field(1, _subject_bytes(subject)))
        parts = [last[1]]
        step_bytes = b""
        if step is not None:
            head = notifications_pb2.TraceStep(rule=step.rule, key=step.key, outcome=step.outcome)
            step_bytes = head.SerializeToString() + self._source
        # A channel that would send now ends its trace with the throttle step (and is refused with it).
        sends_now_suffix = (b"" if throttle_allowed else _THROTTLED) + wire.field(6, step_bytes) if step else b""
        for body, sends_now, slot in self._channels:
            if slot is not None:
                body += wire.field(5, digest_key(subject.user_id, self._category, slot).encode())
            if sends_now:
                body += sends_now_suffix
            parts.append(wire.field(2, body))
        parts.append(wire.field(3, _throttle_state_bytes(state)))
        parts.append(self._tail)
        if step is not None:
            parts.append(wire.field(4, step_bytes))  # and so does the decision's own trace
        return b"".join(parts)


def _throttle_state_bytes(state: ThrottleState) -> bytes:
    """A ThrottleState message's bytes: the counts, then the reset time and store (the same for every
    decision of a window, so converted once)."""
    counts = notifications_pb2.ThrottleState(limit=state.limit, remaining=state.remaining).SerializeToString()
    return counts + _window_bytes(state.resets_at, state.store)


@functools.lru_cache(maxsize=1024)
def _window_bytes(resets_at: datetime | None, store: str) -> bytes:
    return notifications_pb2.ThrottleState(resets_at=timestamp(resets_at), store=store).SerializeToString()


def _subject_bytes(subject: Subject) -> bytes:
    return common_pb2.Subject(user_id=subject.user_id, org_id=subject.org_id).SerializeToString()


def decide_response(decision: bytes) -> bytes:
    """A DecideResponse body without its cursor (the caller appends the cursor field)."""
    return wire.field(1, decision)


def decide_batch_response(decisions: Sequence[bytes]) -> bytes:
    """A DecideBatchResponse body without its cursor."""
    return b"".join(wire.field(1, d) for d in decisions)


def legal_basis_from_pb(number: int, field: str = "legal_basis") -> LegalBasis:
    """A known legal basis; INVALID_ARGUMENT otherwise."""
    basis: LegalBasis | None = LEGAL_BASES.get(number)  # type: ignore[call-overload]
    if basis is None:
        raise invalid(field, "must be a GDPR Art. 6 legal basis")
    return basis


def consent_to_pb(entry: ConsentEntry, now: datetime | None = None) -> notifications_pb2.Consent:
    """A ledger entry; with `now`, its status as of now (a passed expiry reads EXPIRED)."""
    status = entry.status_at(now) if now is not None else entry.status
    return notifications_pb2.Consent(
        user_id=entry.user_id,
        purpose=entry.purpose,
        legal_basis=LEGAL_BASES_PB[entry.legal_basis],
        status=CONSENT_STATUSES_PB[status],
        source=entry.source,
        notice_version=entry.notice_version,
        proof_reference=entry.proof_reference,
        granted_at=timestamp(entry.granted_at),
        expires_at=timestamp(entry.expires_at),
        withdrawn_at=timestamp(entry.withdrawn_at),
        actor=entry.actor,
        entry_id=entry.entry_id,
        recorded_at=timestamp(entry.recorded_at),
    )
