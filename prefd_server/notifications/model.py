"""Notification types: events, channels, decisions and their trace, throttle state, consent ledger entries."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prefd_server.kernel.model import ResolvedValue, Subject

MAX_NAME_LENGTH = 128  # event types, categories, purposes, sources, notice versions, idempotency keys
MAX_PROOF_LENGTH = 512
MAX_RECIPIENTS = 1000


class Channel(enum.StrEnum):
    """A way of reaching a user (the names the settings and the contract use)."""

    EMAIL = "EMAIL"
    SMS = "SMS"
    PUSH = "PUSH"
    IN_APP = "IN_APP"
    WEBHOOK = "WEBHOOK"
    VOICE = "VOICE"


ALL_CHANNELS = tuple(Channel)


class Priority(enum.IntEnum):
    """How urgent an event is; CRITICAL bypasses quiet hours and digests, never consent."""

    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4


class Action(enum.StrEnum):
    """What to do on one channel."""

    SEND_NOW = "SEND_NOW"
    DEFER = "DEFER"
    DIGEST = "DIGEST"
    SUPPRESS = "SUPPRESS"


class Reason(enum.StrEnum):
    """Why a channel got its action."""

    ALLOWED = "ALLOWED"
    CHANNEL_DISABLED = "CHANNEL_DISABLED"
    CATEGORY_DISABLED = "CATEGORY_DISABLED"
    EVENT_DISABLED = "EVENT_DISABLED"
    CONDITION_NOT_MET = "CONDITION_NOT_MET"
    QUIET_HOURS = "QUIET_HOURS"
    DIGEST = "DIGEST"
    THROTTLED = "THROTTLED"
    CONSENT_MISSING = "CONSENT_MISSING"
    CONSENT_WITHDRAWN = "CONSENT_WITHDRAWN"
    CONSENT_EXPIRED = "CONSENT_EXPIRED"
    NO_ADDRESS = "NO_ADDRESS"
    CRITICAL_BYPASS = "CRITICAL_BYPASS"


@dataclass(frozen=True, slots=True)
class Event:
    """What a decision is about: validated, `at` timezone-aware."""

    event_type: str
    category: str
    priority: Priority | None  # None: the event rule's, else MEDIUM
    data: Mapping[str, Any]
    at: datetime
    channels: tuple[Channel, ...]  # candidates, in the order asked


@dataclass(frozen=True, slots=True)
class TraceStep:
    """One rule consulted: the setting it read (with where that value came from) and what it concluded."""

    rule: str
    outcome: str
    key: str = ""
    source: ResolvedValue | None = None


@dataclass(frozen=True, slots=True)
class ChannelDecision:
    """The answer for one channel."""

    channel: Channel
    action: Action
    reason: Reason
    deliver_after: datetime | None = None
    digest_key: str = ""
    trace: tuple[TraceStep, ...] = ()


@dataclass(frozen=True, slots=True)
class ThrottleRule:
    """N sends per window for one user and event type (limit 0: not throttled)."""

    limit: int
    window_s: int


@dataclass(frozen=True, slots=True)
class ThrottleState:
    """A user's throttle for one event type after a decision."""

    limit: int = 0
    remaining: int = 0
    resets_at: datetime | None = None
    store: str = ""  # "redis", "postgresql" or "" (not throttled)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one recipient."""

    subject: Subject
    priority: Priority
    channels: tuple[ChannelDecision, ...]
    throttle: ThrottleState = ThrottleState()
    trace: tuple[TraceStep, ...] = ()


class LegalBasis(enum.StrEnum):
    """The GDPR Art. 6 ground a processing rests on."""

    CONSENT = "consent"
    CONTRACT = "contract"
    LEGAL_OBLIGATION = "legal_obligation"
    VITAL_INTERESTS = "vital_interests"
    PUBLIC_TASK = "public_task"
    LEGITIMATE_INTERESTS = "legitimate_interests"


class ConsentStatus(enum.StrEnum):
    """The state a ledger entry records, or a purpose's state now."""

    GRANTED = "granted"
    WITHDRAWN = "withdrawn"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class ConsentEntry:
    """One append-only ledger entry (a change row of kind consent), or a purpose's current state."""

    user_id: str
    purpose: str
    legal_basis: LegalBasis
    status: ConsentStatus
    source: str = ""
    notice_version: str = ""
    proof_reference: str = ""
    granted_at: datetime | None = None
    expires_at: datetime | None = None
    withdrawn_at: datetime | None = None
    actor: str = ""
    entry_id: int = 0
    recorded_at: datetime | None = None

    def status_at(self, now: datetime) -> ConsentStatus:
        """GRANTED, WITHDRAWN, or EXPIRED when a grant's expiry has passed at `now`."""
        if self.status is ConsentStatus.GRANTED and self.expires_at is not None and self.expires_at <= now:
            return ConsentStatus.EXPIRED
        return self.status
