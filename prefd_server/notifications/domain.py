"""Builds the notifications domain on the kernel: the consent ledger, throttles, decisions and their service."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from prefd_server.kernel.model import Subject
from prefd_server.kernel.parts import EFFECTIVE_VALUES, Domain, Kernel
from prefd_server.kernel.value_checks import VALUE_CHECKS
from prefd_server.notifications.consents import ConsentLedger
from prefd_server.notifications.decision_memo import DecisionMemo
from prefd_server.notifications.event_rules import event_rules_problems
from prefd_server.notifications.privacy import ConsentPrivacy
from prefd_server.notifications.rules import CONSENT_PURPOSES_KEY, EVENT_RULES_KEY
from prefd_server.notifications.service import NotificationService
from prefd_server.notifications.throttle import Throttles
from prefd_server.notifications.throttle_privacy import ThrottlePrivacy
from prefd_server.settings import Settings

# Resolves only GLOBAL (and default) layers: no stored user or org has this id.
_NOBODY = Subject("*")


async def register(kernel: Kernel, settings: Settings) -> Domain:
    """Decisions read settings through the effective values preferences provides; the condition grammar of
    `notifications.event_rules` is checked whenever that setting is written."""
    effective = kernel.provisions.get(EFFECTIVE_VALUES)
    kernel.provisions.get(VALUE_CHECKS).add(EVENT_RULES_KEY, event_rules_problems)

    async def known_purposes() -> Collection[str]:
        (values,) = await effective.resolve([_NOBODY], [CONSENT_PURPOSES_KEY], ())
        mapping = values[0].value if values and isinstance(values[0].value, dict) else {}
        return {purpose for purpose in mapping.values() if isinstance(purpose, str)}

    ledger = ConsentLedger(kernel.pool, kernel.commits, known_purposes, kernel.caches)
    kernel.feed.add_listener(ledger.on_changes)
    throttles = Throttles(kernel.pool, kernel.redis)
    memo: DecisionMemo[Any] = DecisionMemo(kernel.commits, kernel.caches)
    kernel.feed.add_listener(memo.on_changes)
    kernel.privacy.register(ConsentPrivacy())
    kernel.privacy.register(ThrottlePrivacy(throttles))

    async def stop(_grace_s: float) -> None:
        await throttles.close()

    return Domain("notifications", [NotificationService(kernel, effective, ledger, throttles, memo)], stop)
