"""The notification decision (pure): the rule order per channel, then the throttle's verdict, each step traced."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, time, tzinfo

from prefd_server.kernel.conditions import conditions_met
from prefd_server.kernel.model import ResolvedValue, Subject
from prefd_server.notifications.event_rules import EventRule, event_rules_problems, read_event_rule
from prefd_server.notifications.model import (
    Action,
    Channel,
    ChannelDecision,
    ConsentEntry,
    ConsentStatus,
    Decision,
    Event,
    Priority,
    Reason,
    ThrottleRule,
    ThrottleState,
    TraceStep,
)
from prefd_server.notifications.schedule import (
    WEEKDAYS,
    digest_key,
    next_slot,
    next_window_start,
    parse_clock,
    quiet_until,
    zone,
)

__all__ = ["Evaluation", "evaluate", "event_rules_problems", "finish", "throttle_step"]

EVENT_RULES_KEY = "notifications.event_rules"
TIMEZONE_KEY = "locale.timezone"
CRITICAL_BYPASS_KEY = "notifications.critical_bypass_throttle"
CATEGORY_CHANNELS_KEY = "notifications.category_channels"
CONSENT_PURPOSES_KEY = "notifications.consent_purposes"
FREQUENCY_KEY = "notifications.frequency"
CATEGORY_FREQUENCY_KEY = "notifications.category_frequency"
DIGEST_TIME_KEY = "notifications.digest.time"
DIGEST_WEEKDAY_KEY = "notifications.digest.weekday"
QUIET = "notifications.quiet_hours."
ADDRESS_KEYS = {
    Channel.SMS: "notifications.sms.phone_number",
    Channel.WEBHOOK: "notifications.webhook.url",
    Channel.VOICE: "notifications.voice.phone_number",
}
_CONSENT_REASONS = {ConsentStatus.WITHDRAWN: Reason.CONSENT_WITHDRAWN, ConsentStatus.EXPIRED: Reason.CONSENT_EXPIRED}


def channel_key(channel: Channel) -> str:
    """The switch of one channel, e.g. notifications.in_app.enabled."""
    return f"notifications.{channel.value.lower()}.enabled"


def category_key(category: str) -> str:
    """The switch of one category (allowed when no such definition exists)."""
    return f"notifications.categories.{category}"


class _Settings:
    """The subject's resolved notification settings; a missing key reads as its default."""

    def __init__(self, resolved: Mapping[str, ResolvedValue]) -> None:
        self._resolved = resolved

    def get(self, key: str, default: object, kind: type | tuple[type, ...]) -> object:
        found = self._resolved.get(key)
        return found.value if found is not None and isinstance(found.value, kind) else default

    def flag(self, key: str, default: bool) -> bool:
        return bool(self.get(key, default, bool))

    def text(self, key: str, default: str) -> str:
        return str(self.get(key, default, str))

    def step(self, rule: str, outcome: str, key: str) -> TraceStep:
        found = self._resolved.get(key)
        if found is None:
            outcome += " (undefined: default)"
        return TraceStep(rule=rule, outcome=outcome, key=key, source=found)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Rules 1-9 applied; SEND_NOW channels still wait for the throttle (`throttle` None: not throttled)."""

    subject: Subject
    event: Event
    priority: Priority
    channels: tuple[ChannelDecision, ...]
    throttle: ThrottleRule | None
    trace: tuple[TraceStep, ...]
    rules_source: ResolvedValue | None = None  # where the event rules (and so the throttle) came from
    # The first instant after the event's time at which the same settings could decide otherwise (a quiet
    # window opening or closing, a digest slot passing), and the first consent expiry after `now`: an
    # evaluation for `at` = now answers every later moment before both; for a given `at`, before the second.
    schedule_changes_at: datetime | None = None
    consent_changes_at: datetime | None = None
    condition_paths: tuple[str, ...] = ()  # the paths into the event's data its rule's conditions read

    @property
    def needs_throttle(self) -> bool:
        """Whether the throttle must be checked (and, with consume, charged once): a channel would send now."""
        return self.throttle is not None and any(c.action is Action.SEND_NOW for c in self.channels)


@dataclass(frozen=True, slots=True)
class _Context:
    """What every channel's rules read, worked out once per decision."""

    settings: _Settings
    subject: Subject
    event: Event
    priority: Priority
    rule: EventRule | None
    conditions: tuple[bool, str]
    consent_at: datetime
    consents: Mapping[str, ConsentEntry]
    quiet: _Quiet
    quiet_in_app: _Quiet
    digest: _Digest
    throttle_bypassed: bool


_Quiet = tuple[datetime | None, tuple[TraceStep, ...]]
_Digest = tuple[datetime | None, str, TraceStep]
_Check = Callable[[_Context, Channel], tuple[TraceStep | None, Reason | None]]


def _event_rule_check(ctx: _Context, channel: Channel) -> tuple[TraceStep | None, Reason | None]:
    rule, name = ctx.rule, ctx.event.event_type
    if rule is None:
        return ctx.settings.step("event_rule", f"no rule for {name}: allowed", EVENT_RULES_KEY), None
    if not rule.enabled:
        return ctx.settings.step("event_rule", f"{name} is disabled", EVENT_RULES_KEY), Reason.EVENT_DISABLED
    if rule.channels is not None and channel not in rule.channels:
        listed = ", ".join(sorted(rule.channels)) or "none"
        outcome = f"{channel} is not among {name}'s channels ({listed})"
        return ctx.settings.step("event_rule", outcome, EVENT_RULES_KEY), Reason.EVENT_DISABLED
    return ctx.settings.step("event_rule", f"{name} is enabled on {channel}", EVENT_RULES_KEY), None


def _conditions_check(ctx: _Context, channel: Channel) -> tuple[TraceStep | None, Reason | None]:
    met, why = ctx.conditions
    return ctx.settings.step("conditions", why, EVENT_RULES_KEY), None if met else Reason.CONDITION_NOT_MET


def _channel_check(ctx: _Context, channel: Channel) -> tuple[TraceStep | None, Reason | None]:
    on = ctx.settings.flag(channel_key(channel), True)
    step = ctx.settings.step("channel", f"{channel} is {'enabled' if on else 'disabled'}", channel_key(channel))
    return step, None if on else Reason.CHANNEL_DISABLED


def _category_check(ctx: _Context, channel: Channel) -> tuple[TraceStep | None, Reason | None]:
    key, category = category_key(ctx.event.category), ctx.event.category
    on = ctx.settings.flag(key, True)
    step = ctx.settings.step("category", f"{category} is {'enabled' if on else 'disabled'}", key)
    return step, None if on else Reason.CATEGORY_DISABLED


def _category_channel_check(ctx: _Context, channel: Channel) -> tuple[TraceStep | None, Reason | None]:
    table = ctx.settings.get(CATEGORY_CHANNELS_KEY, {}, dict)
    row = table.get(ctx.event.category) if isinstance(table, dict) else None
    off = isinstance(row, dict) and row.get(channel.value) is False
    outcome = f"{ctx.event.category} on {channel} is {'disabled' if off else 'allowed'}"
    return ctx.settings.step(
        "category_channel", outcome, CATEGORY_CHANNELS_KEY
    ), Reason.CATEGORY_DISABLED if off else None


def _address_check(ctx: _Context, channel: Channel) -> tuple[TraceStep | None, Reason | None]:
    key = ADDRESS_KEYS.get(channel)
    if key is None:
        return None, None
    present = bool(ctx.settings.text(key, "").strip())
    step = ctx.settings.step("address", f"{channel} address is {'set' if present else 'not set'}", key)
    return step, None if present else Reason.NO_ADDRESS


def _consent_check(ctx: _Context, channel: Channel) -> tuple[TraceStep | None, Reason | None]:
    purposes = ctx.settings.get(CONSENT_PURPOSES_KEY, {}, dict)
    purpose = purposes.get(ctx.event.category) if isinstance(purposes, dict) else None
    if not isinstance(purpose, str):
        return ctx.settings.step("consent", f"{ctx.event.category} needs no consent", CONSENT_PURPOSES_KEY), None
    entry = ctx.consents.get(purpose)
    reason: Reason | None
    if entry is None:
        outcome, reason = f"no consent recorded for {purpose}", Reason.CONSENT_MISSING
    else:
        status = entry.status_at(ctx.consent_at)
        outcome = f"consent for {purpose} is {status.value} (entry {entry.entry_id})"
        reason = _CONSENT_REASONS.get(status, Reason.CONSENT_MISSING) if status is not ConsentStatus.GRANTED else None
    return ctx.settings.step("consent", outcome, CONSENT_PURPOSES_KEY), reason


_GATES: tuple[_Check, ...] = (
    _event_rule_check,
    _conditions_check,
    _channel_check,
    _category_check,
    _category_channel_check,
    _address_check,
    _consent_check,
)


def _quiet(settings: _Settings, event: Event, tz: tzinfo, tz_name: str) -> tuple[_Quiet, _Quiet, datetime | None]:
    """When quiet hours end at the event's time (None: not quiet) with the steps read: for most channels, IN_APP;
    and when that changes (the window's end, or the next window's start)."""
    enabled_key, in_app_key = QUIET + "enabled", QUIET + "defer_in_app"
    if not settings.flag(enabled_key, False):
        off = (None, (settings.step("quiet_hours", "quiet hours are off", enabled_key),))
        return off, off, None
    on = settings.step("quiet_hours", "quiet hours are on", enabled_key)
    start_text, end_text = settings.text(QUIET + "start", "22:00"), settings.text(QUIET + "end", "07:00")
    start, end = parse_clock(start_text), parse_clock(end_text)
    changes_at = None
    if start is None or end is None:
        until, outcome = None, f"malformed window {start_text}-{end_text}: ignored"
    else:
        days = settings.get(QUIET + "days", list(WEEKDAYS), list)
        listed = [day for day in days if isinstance(day, str)] if isinstance(days, list) else []
        until = quiet_until(event.at, start, end, listed, tz)
        changes_at = until or next_window_start(event.at, start, end, listed, tz)
        window = f"{start_text}-{end_text} {','.join(listed) or 'no day'} ({tz_name})"
        outcome = f"{window}: quiet until {until.isoformat()}" if until else f"{window}: not in the window"
    quiet = (until, (on, settings.step("quiet_hours", outcome, QUIET + "start")))
    if settings.flag(in_app_key, False):
        return quiet, quiet, changes_at
    return quiet, (None, (on, settings.step("quiet_hours", "IN_APP is not deferred", in_app_key))), changes_at


def _digest(settings: _Settings, subject: Subject, event: Event, tz: tzinfo, tz_name: str) -> _Digest:
    """The digest slot and key for the event's category (None: immediate), and the step that read its frequency."""
    table = settings.get(CATEGORY_FREQUENCY_KEY, {}, dict)
    own = table.get(event.category) if isinstance(table, dict) else None
    key = CATEGORY_FREQUENCY_KEY if isinstance(own, str) else FREQUENCY_KEY
    frequency = own if isinstance(own, str) else settings.text(FREQUENCY_KEY, "immediate")
    if frequency == "immediate":
        return None, "", settings.step("frequency", f"{event.category} is immediate", key)
    clock = parse_clock(settings.text(DIGEST_TIME_KEY, "09:00")) or time(9)
    weekday = settings.text(DIGEST_WEEKDAY_KEY, "MON")
    slot = next_slot(event.at, frequency, clock, weekday if weekday.upper() in WEEKDAYS else "MON", tz)
    if slot is None:
        return None, "", settings.step("frequency", f"{event.category} is {frequency}: unknown, immediate", key)
    outcome = f"{event.category} is {frequency}: next slot {slot.isoformat()} ({tz_name})"
    return slot, digest_key(subject.user_id, event.category, slot), settings.step("frequency", outcome, key)


# Gates whose answer is the same for every channel: worked out once per decision.
_CHANNEL_FREE = frozenset({_conditions_check, _category_check, _consent_check})
_Gated = Mapping[_Check, tuple[TraceStep | None, Reason | None]]


def _decide_channel(ctx: _Context, shared: _Gated, channel: Channel) -> ChannelDecision:
    trace: list[TraceStep] = []
    for gate in _GATES:
        step, reason = shared[gate] if gate in shared else gate(ctx, channel)
        if step is not None:
            trace.append(step)
        if reason is not None:
            return ChannelDecision(channel, Action.SUPPRESS, reason, trace=tuple(trace))
    until, quiet_steps = ctx.quiet_in_app if channel is Channel.IN_APP else ctx.quiet
    slot, key, digest_step = ctx.digest
    if ctx.priority is Priority.CRITICAL:
        hits = (("quiet hours", until), ("digest", slot), ("throttle", ctx.throttle_bypassed))
        bypassed = [name for name, hit in hits if hit]
        outcome = f"CRITICAL bypasses {', '.join(bypassed)}" if bypassed else "CRITICAL: nothing to bypass"
        trace.append(ctx.settings.step("critical", outcome, CRITICAL_BYPASS_KEY))
        reason = Reason.CRITICAL_BYPASS if bypassed else Reason.ALLOWED
        return ChannelDecision(channel, Action.SEND_NOW, reason, trace=tuple(trace))
    trace += quiet_steps
    if until is not None:
        return ChannelDecision(channel, Action.DEFER, Reason.QUIET_HOURS, deliver_after=until, trace=tuple(trace))
    trace.append(digest_step)
    if slot is not None:
        return ChannelDecision(channel, Action.DIGEST, Reason.DIGEST, slot, key, tuple(trace))
    return ChannelDecision(channel, Action.SEND_NOW, Reason.ALLOWED, trace=tuple(trace))


def evaluate(
    subject: Subject,
    event: Event,
    settings: Mapping[str, ResolvedValue],
    consents: Mapping[str, ConsentEntry],
    now: datetime,
) -> Evaluation:
    """Rules 1-9 for every candidate channel of `event`: the answer for each unless the throttle intervenes.

    `settings` holds the subject's resolved notifications.* keys and locale.timezone (a missing key reads as
    undefined: switches allowed, other settings at their defaults); `consents` the current entry per purpose.
    Consent must hold at both `event.at` and `now` (whichever is later), since the send happens from now on.
    """
    read = _Settings(settings)
    rule = read_event_rule(read.get(EVENT_RULES_KEY, {}, dict), event.event_type)
    trace: list[TraceStep] = []
    if rule is not None and rule.problems:
        trace.append(
            read.step("event_rule", f"malformed rule for {event.event_type}: {rule.problems[0]}", EVENT_RULES_KEY)
        )
    priority = event.priority or (rule.priority if rule else None) or Priority.MEDIUM
    if event.priority is None and rule is not None and rule.priority is not None:
        trace.append(read.step("priority", f"{priority.name} (the event rule's)", EVENT_RULES_KEY))
    else:
        trace.append(TraceStep("priority", f"{priority.name} ({'the request' if event.priority else 'default'})"))
    tz_name = read.text(TIMEZONE_KEY, "UTC")
    tz, known = zone(tz_name)
    trace.append(read.step("timezone", tz_name if known else f"unknown zone {tz_name[:64]!r}: UTC", TIMEZONE_KEY))
    tz_name = tz_name if known else "UTC"
    throttle = rule.throttle if rule is not None else None
    bypassed = throttle is not None and priority is Priority.CRITICAL and read.flag(CRITICAL_BYPASS_KEY, True)
    if bypassed:
        trace.append(read.step("throttle", "CRITICAL bypasses the throttle", CRITICAL_BYPASS_KEY))
    quiet, quiet_in_app, quiet_changes_at = _quiet(read, event, tz, tz_name)
    digest = _digest(read, subject, event, tz, tz_name)
    ctx = _Context(
        settings=read,
        subject=subject,
        event=event,
        priority=priority,
        rule=rule,
        conditions=conditions_met(rule.conditions, event.data) if rule is not None else (True, "no conditions"),
        consent_at=max(event.at, now),
        consents=consents,
        quiet=quiet,
        quiet_in_app=quiet_in_app,
        digest=digest,
        throttle_bypassed=bypassed,
    )
    shared: _Gated = {gate: gate(ctx, Channel.EMAIL) for gate in _CHANNEL_FREE}
    channels = tuple(_decide_channel(ctx, shared, channel) for channel in event.channels)
    throttle = None if bypassed else throttle
    return Evaluation(
        subject,
        event,
        priority,
        channels,
        throttle,
        tuple(trace),
        settings.get(EVENT_RULES_KEY),
        _earliest(quiet_changes_at, digest[0]),
        _earliest(*(_expiry_after(entry, ctx.consent_at) for entry in consents.values())),
        tuple(str(p) for p in rule.conditions) if rule is not None and isinstance(rule.conditions, Mapping) else (),
    )


def _expiry_after(entry: ConsentEntry, at: datetime) -> datetime | None:
    """When a grant in force at `at` expires (None: not granted then, or no expiry)."""
    if entry.status is ConsentStatus.GRANTED and entry.expires_at is not None and entry.expires_at > at:
        return entry.expires_at
    return None


def _earliest(*instants: datetime | None) -> datetime | None:
    return min((i for i in instants if i is not None), default=None)


def finish(evaluation: Evaluation, throttle_allowed: bool, state: ThrottleState) -> Decision:
    """The decision: channels that would send now are SUPPRESS THROTTLED when the throttle does not allow it.

    Call with the throttle's verdict when `evaluation.needs_throttle` (else any value: it is not consulted);
    `state` is reported as the decision's throttle state either way.
    """
    step = throttle_step(evaluation, throttle_allowed, state)
    if step is None:
        return Decision(evaluation.subject, evaluation.priority, evaluation.channels, state, evaluation.trace)
    channels = tuple(
        replace(
            decision,
            action=decision.action if throttle_allowed else Action.SUPPRESS,
            reason=decision.reason if throttle_allowed else Reason.THROTTLED,
            trace=(*decision.trace, step),
        )
        if decision.action is Action.SEND_NOW
        else decision
        for decision in evaluation.channels
    )
    return Decision(evaluation.subject, evaluation.priority, channels, state, (*evaluation.trace, step))


def throttle_step(evaluation: Evaluation, throttle_allowed: bool, state: ThrottleState) -> TraceStep | None:
    """The throttle's trace step, the last of the decision and of each channel that would send now (None:
    no throttle applies). Arguments as for finish."""
    rule = evaluation.throttle
    if rule is None:
        return None
    resets = f", resets at {state.resets_at.isoformat()}" if state.resets_at else ""
    window = f"{rule.limit} per {rule.window_s // 60} min"
    if not evaluation.needs_throttle:
        outcome = f"{window}: nothing sent now, not charged"
    elif throttle_allowed:
        outcome = f"{window}: allowed, {state.remaining} left{resets} ({state.store or 'no store'})"
    else:
        outcome = f"{window}: exceeded{resets} ({state.store or 'no store'})"
    return TraceStep(rule="throttle", outcome=outcome, key=EVENT_RULES_KEY, source=evaluation.rules_source)
