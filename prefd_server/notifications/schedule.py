"""Notification time rules: the user's zone, quiet-hours windows and their end, digest slots and keys (pure)."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Collection
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

WEEKDAYS = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")
FREQUENCIES = ("immediate", "hourly", "daily", "weekly")
_CLOCK = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_MAX_CHAINED_WINDOWS = 8


@functools.lru_cache(maxsize=512)
def zone(name: str) -> tuple[tzinfo, bool]:
    """The IANA zone `name`, and whether it is known (an unknown or malformed name gives UTC, False)."""
    try:
        return ZoneInfo(name), True
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        return UTC, False


def parse_clock(text: object) -> time | None:
    """A "HH:MM" 24-hour time of day, or None when malformed."""
    if not isinstance(text, str) or not (match := _CLOCK.fullmatch(text)):
        return None
    return time(int(match[1]), int(match[2]))


def local_instant(day: date, clock: time, tz: tzinfo) -> datetime:
    """The UTC instant of wall time `clock` on `day` in `tz`.

    In a fold (the clock goes back) the first occurrence; in a gap (the clock skips ahead) the first valid
    instant after it, i.e. the transition itself.
    """
    naive = datetime.combine(day, clock)
    first = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == naive:
        return first
    second = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    low, high = int(min(first, second).timestamp()), int(max(first, second).timestamp())
    before = _offset(low, tz)
    while high - low > 1:  # the transition lies between the two readings of the skipped wall time
        middle = (low + high) // 2
        if _offset(middle, tz) == before:
            low = middle
        else:
            high = middle
    return datetime.fromtimestamp(high, UTC)


def _offset(timestamp: int, tz: tzinfo) -> timedelta | None:
    return datetime.fromtimestamp(timestamp, UTC).astimezone(tz).utcoffset()


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _window_end(at: datetime, start: time, end: time, days: Collection[str], tz: tzinfo) -> datetime | None:
    """The end of the quiet window containing `at` (windows start on a listed day), or None."""
    today = at.astimezone(tz).date()
    for first_day in (today - timedelta(days=1), today):
        if WEEKDAYS[first_day.weekday()] not in days:
            continue
        last_day = first_day if end > start else first_day + timedelta(days=1)
        opens, closes = local_instant(first_day, start, tz), local_instant(last_day, end, tz)
        if opens <= at < closes:
            return closes
    return None


def quiet_until(at: datetime, start: time, end: time, days: Collection[str], tz: tzinfo) -> datetime | None:
    """When the quiet window containing `at` ends (a UTC instant after `at`), or None outside quiet hours.

    The window runs from `start` to `end` in `tz` and crosses midnight when `end` <= `start`; `days` (MON..SUN)
    are the days a window starts on. `start == end` is an empty window. An end that lands inside another
    window (possible only around DST gaps) is carried to that window's end.
    """
    if start == end:
        return None
    at = _aware(at)
    listed = {day.upper() for day in days}
    until = at
    for _ in range(_MAX_CHAINED_WINDOWS):
        closes = _window_end(until, start, end, listed, tz)
        if closes is None:
            break
        until = closes
    return None if until == at else until


def next_window_start(at: datetime, start: time, end: time, days: Collection[str], tz: tzinfo) -> datetime | None:
    """When the next quiet window opens strictly after `at` (None: never, for an empty window or no listed day)."""
    if start == end:
        return None
    at = _aware(at)
    listed = {day.upper() for day in days}
    today = at.astimezone(tz).date()
    for ahead in range(9):
        day = today + timedelta(days=ahead)
        if WEEKDAYS[day.weekday()] in listed:
            opens = local_instant(day, start, tz)
            if opens > at:
                return opens
    return None


def _next_top_of_hour(at: datetime, tz: tzinfo) -> datetime:
    # Local hours need not start on UTC hours (UTC+05:30, +05:45); a DST change may shift the offset.
    seconds = int(at.timestamp() // 1)
    found: list[datetime] = []
    for probe in (at, at + timedelta(hours=3)):
        delta = probe.astimezone(tz).utcoffset() or timedelta(0)
        offset = int(delta.total_seconds())
        candidate = datetime.fromtimestamp(((seconds + offset) // 3600 + 1) * 3600 - offset, UTC)
        local = candidate.astimezone(tz)
        if candidate > at and local.minute == 0 and local.second == 0:
            found.append(candidate)
    return min(found) if found else datetime.fromtimestamp((seconds // 3600 + 1) * 3600, UTC)


def next_slot(at: datetime, frequency: str, time_of_day: time, weekday: str, tz: tzinfo) -> datetime | None:
    """The next digest slot strictly after `at` (UTC), or None for "immediate" or an unknown frequency.

    hourly: the next top of the hour in `tz`; daily: the next `time_of_day` in `tz`; weekly: the next
    `time_of_day` on `weekday` (MON..SUN) in `tz`. A slot in a DST gap is the first valid instant after it.
    """
    at = _aware(at)
    if frequency == "hourly":
        return _next_top_of_hour(at, tz)
    if frequency not in ("daily", "weekly"):
        return None
    today = at.astimezone(tz).date()
    wanted = weekday.upper() if frequency == "weekly" else None
    for ahead in range(-1, 9):
        day = today + timedelta(days=ahead)
        if wanted is not None and WEEKDAYS[day.weekday()] != wanted:
            continue
        slot = local_instant(day, time_of_day, tz)
        if slot > at:
            return slot
    return None  # only for a weekday name that is not MON..SUN


def digest_key(user_id: str, category: str, slot: datetime) -> str:
    """A stable opaque key per (user, category, slot) for the caller to group digest items by."""
    material = json.dumps([user_id, category, slot.astimezone(UTC).isoformat()], separators=(",", ":"))
    return "dg_" + hashlib.sha256(material.encode()).hexdigest()[:32]
