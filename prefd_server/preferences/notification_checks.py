"""Shape checks of the notification settings a definition's type cannot express (times, maps by category)."""

from __future__ import annotations

import re
from collections.abc import Callable

from prefd_server.kernel.model import JsonValue
from prefd_server.kernel.value_checks import ValueChecks

# The names the notification settings use; they match the notifications contract.
CHANNELS = ("EMAIL", "SMS", "PUSH", "IN_APP", "WEBHOOK", "VOICE")
FREQUENCIES = ("immediate", "hourly", "daily", "weekly")
WEEKDAYS = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")
MAX_NAME_LENGTH = 128  # categories and consent purposes
_TIME_OF_DAY = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")
_MAX_REPORTED = 5  # problems reported per value, so one bad map does not flood the answer


def time_of_day_problems(value: JsonValue) -> list[str]:
    """A time of day must be HH:MM on a 24-hour clock (00:00 to 23:59)."""
    if isinstance(value, str) and _TIME_OF_DAY.fullmatch(value):
        return []
    return [f"must be a time of day as HH:MM, 00:00 to 23:59 (got {value!r})"]


def weekday_list_problems(value: JsonValue) -> list[str]:
    """A list of weekdays names each of MON..SUN at most once."""
    if not isinstance(value, list):
        return ["must be a list of weekdays"]
    problems = [f"{day!r} is not one of {', '.join(WEEKDAYS)}" for day in value if day not in WEEKDAYS]
    repeated = sorted({day for day in value if isinstance(day, str) and value.count(day) > 1})
    problems += [f"names {day} more than once" for day in repeated]
    return problems[:_MAX_REPORTED]


def _name_problem(name: str, what: str) -> str:
    """Why `name` is not a usable category or purpose name ("" when it is)."""
    if not name or len(name) > MAX_NAME_LENGTH:
        return f"{what} names must be 1-{MAX_NAME_LENGTH} characters (got {name[:40]!r})"
    if not name.isprintable():
        return f"{what} names must not contain control characters (got {name[:40]!r})"
    return ""


def _by_category(entry_problems: Callable[[str, JsonValue], list[str]]) -> Callable[[JsonValue], list[str]]:
    """A check of a JSON object keyed by category whose entries `entry_problems` checks."""

    def check(value: JsonValue) -> list[str]:
        if not isinstance(value, dict):
            return ["must be a JSON object keyed by category"]
        problems = []
        for category, entry in value.items():
            problem = _name_problem(category, "category")
            problems += [problem] if problem else entry_problems(category, entry)
        return problems[:_MAX_REPORTED]

    return check


def _channel_switches(category: str, entry: JsonValue) -> list[str]:
    if not isinstance(entry, dict):
        return [f"[{category!r}] must be an object of channel: bool"]
    problems = []
    for channel, switch in entry.items():
        if channel not in CHANNELS:
            problems.append(f"[{category!r}] {channel!r} is not a channel ({', '.join(CHANNELS)})")
        elif not isinstance(switch, bool):
            problems.append(f"[{category!r}][{channel!r}] must be a bool")
    return problems


def _frequency(category: str, entry: JsonValue) -> list[str]:
    if isinstance(entry, str) and entry in FREQUENCIES:
        return []
    return [f"[{category!r}] must be one of {', '.join(FREQUENCIES)} (got {entry!r})"]


def _purpose(category: str, entry: JsonValue) -> list[str]:
    if not isinstance(entry, str):
        return [f"[{category!r}] must be a consent purpose name"]
    problem = _name_problem(entry, "purpose")
    return [f"[{category!r}] {problem}"] if problem else []


category_channels_problems = _by_category(_channel_switches)
category_frequency_problems = _by_category(_frequency)
consent_purposes_problems = _by_category(_purpose)


def add_notification_checks(checks: ValueChecks) -> None:
    """Register the shape checks of the notification settings (event rule conditions are the
    notifications domain's to check)."""
    for key in ("notifications.quiet_hours.start", "notifications.quiet_hours.end", "notifications.digest.time"):
        checks.add(key, time_of_day_problems)
    checks.add("notifications.quiet_hours.days", weekday_list_problems)
    checks.add("notifications.category_channels", category_channels_problems)
    checks.add("notifications.category_frequency", category_frequency_problems)
    checks.add("notifications.consent_purposes", consent_purposes_problems)
