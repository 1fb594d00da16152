"""Quiet hours and digest slots: DST changes in New York and Berlin, midnight crossings, three timezones (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta, tzinfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefd_server.notifications.schedule import (
    WEEKDAYS,
    digest_key,
    local_instant,
    next_slot,
    parse_clock,
    quiet_until,
    zone,
)

NEW_YORK = zone("America/New_York")[0]
BERLIN = zone("Europe/Berlin")[0]
KOLKATA = zone("Asia/Kolkata")[0]
ALL_DAYS = list(WEEKDAYS)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def local(tz: tzinfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0, fold: int = 0) -> datetime:
    """The UTC instant of a wall time in `tz` (`fold=1`: the second of a repeated time)."""
    return datetime(year, month, day, hour, minute, tzinfo=tz, fold=fold).astimezone(UTC)


# 2024 changes: New York 10 March 02:00 EST -> 03:00 EDT, 3 November 02:00 EDT -> 01:00 EST;
# Berlin 31 March 02:00 CET -> 03:00 CEST, 27 October 03:00 CEST -> 02:00 CET.
@pytest.mark.parametrize(
    ("tz", "at", "until"),
    [
        # overnight windows spanning each change end at 07:00 local on the new offset
        (NEW_YORK, local(NEW_YORK, 2024, 3, 9, 23, 0), utc(2024, 3, 10, 11, 0)),
        (NEW_YORK, local(NEW_YORK, 2024, 11, 2, 23, 0), utc(2024, 11, 3, 12, 0)),
        (BERLIN, local(BERLIN, 2024, 3, 30, 23, 0), utc(2024, 3, 31, 5, 0)),
        (BERLIN, local(BERLIN, 2024, 10, 26, 23, 0), utc(2024, 10, 27, 6, 0)),
        # inside the window after the change itself
        (NEW_YORK, local(NEW_YORK, 2024, 3, 10, 3, 30), utc(2024, 3, 10, 11, 0)),
        (BERLIN, local(BERLIN, 2024, 10, 27, 2, 30, fold=1), utc(2024, 10, 27, 6, 0)),
    ],
)
def test_overnight_quiet_hours_across_dst(tz: tzinfo, at: datetime, until: datetime) -> None:
    assert quiet_until(at, time(22), time(7), ALL_DAYS, tz) == until


def test_window_end_in_a_gap_moves_to_the_first_valid_instant() -> None:
    # 02:30 does not exist on these days: the window ends at 03:00 on the new offset
    assert quiet_until(local(NEW_YORK, 2024, 3, 10, 1, 30), time(0), time(2, 30), ALL_DAYS, NEW_YORK) == utc(
        2024, 3, 10, 7, 0
    )
    assert quiet_until(local(BERLIN, 2024, 3, 31, 1, 30), time(0), time(2, 30), ALL_DAYS, BERLIN) == utc(
        2024, 3, 31, 1, 0
    )
    assert local_instant(datetime(2024, 3, 10).date(), time(2, 0), NEW_YORK) == utc(2024, 3, 10, 7, 0)


def test_window_end_in_a_fold_is_the_first_occurrence() -> None:
    # 01:30 happens twice in New York on 3 November: the window 00:00-01:30 ends at the first (EDT)
    first_half_past_one = utc(2024, 11, 3, 5, 30)
    assert quiet_until(local(NEW_YORK, 2024, 11, 3, 0, 30), time(0), time(1, 30), ALL_DAYS, NEW_YORK) == (
        first_half_past_one
    )
    # the repeated hour (01:00-02:00 EST) is after the window's end
    assert quiet_until(local(NEW_YORK, 2024, 11, 3, 1, 15, fold=1), time(0), time(1, 30), ALL_DAYS, NEW_YORK) is None
    # Berlin repeats 02:00-03:00 on 27 October
    assert quiet_until(local(BERLIN, 2024, 10, 27, 1, 0), time(0), time(2, 30), ALL_DAYS, BERLIN) == utc(
        2024, 10, 27, 0, 30
    )


def test_midnight_crossing_belongs_to_the_day_it_starts() -> None:
    friday_only = ["FRI"]
    # 2024-06-07 is a Friday
    assert quiet_until(local(BERLIN, 2024, 6, 7, 21, 59), time(22), time(7), friday_only, BERLIN) is None
    start = local(BERLIN, 2024, 6, 7, 22, 0)
    assert quiet_until(start, time(22), time(7), friday_only, BERLIN) == local(BERLIN, 2024, 6, 8, 7, 0)
    saturday_2am = local(BERLIN, 2024, 6, 8, 2, 0)
    assert quiet_until(saturday_2am, time(22), time(7), friday_only, BERLIN) == local(BERLIN, 2024, 6, 8, 7, 0)
    assert quiet_until(local(BERLIN, 2024, 6, 8, 7, 0), time(22), time(7), friday_only, BERLIN) is None
    assert quiet_until(local(BERLIN, 2024, 6, 8, 23, 0), time(22), time(7), friday_only, BERLIN) is None
    # a Thursday-night window does not cover Friday early morning when only Friday is listed
    assert quiet_until(local(BERLIN, 2024, 6, 7, 2, 0), time(22), time(7), friday_only, BERLIN) is None


def test_same_day_windows_empty_windows_and_no_days() -> None:
    noon = local(NEW_YORK, 2024, 6, 5, 13, 30)
    assert quiet_until(noon, time(13), time(14), ALL_DAYS, NEW_YORK) == local(NEW_YORK, 2024, 6, 5, 14, 0)
    assert quiet_until(noon, time(14), time(15), ALL_DAYS, NEW_YORK) is None
    assert quiet_until(noon, time(13), time(13), ALL_DAYS, NEW_YORK) is None
    assert quiet_until(noon, time(13), time(14), [], NEW_YORK) is None
    assert quiet_until(noon, time(13), time(14), ["wed"], NEW_YORK) is not None  # days are case-insensitive


def test_unknown_zones_fall_back_to_utc_and_say_so() -> None:
    assert zone("Europe/Berlin")[1] is True
    for name in ("", "Mars/Olympus", "../../etc/passwd", "/etc/localtime", "x" * 300, "a\x00b"):
        assert zone(name) == (UTC, False), name


def test_clock_parsing() -> None:
    assert parse_clock("07:05") == time(7, 5)
    assert parse_clock("23:59") == time(23, 59)
    for bad in ("24:00", "7:05", "07:60", "0705", "", None, 705):
        assert parse_clock(bad) is None


@pytest.mark.parametrize(
    ("tz", "at", "frequency", "slot"),
    [
        # hourly: the next top of the local hour (Kolkata is UTC+05:30)
        (KOLKATA, utc(2024, 6, 5, 10, 10), "hourly", utc(2024, 6, 5, 10, 30)),
        (NEW_YORK, utc(2024, 6, 5, 10, 10), "hourly", utc(2024, 6, 5, 11, 0)),
        (NEW_YORK, utc(2024, 6, 5, 11, 0), "hourly", utc(2024, 6, 5, 12, 0)),  # strictly after
        (NEW_YORK, utc(2024, 11, 3, 5, 30), "hourly", utc(2024, 11, 3, 6, 0)),  # 01:30 EDT -> 01:00 EST
        (BERLIN, utc(2024, 3, 31, 0, 30), "hourly", utc(2024, 3, 31, 1, 0)),  # 01:30 CET -> 03:00 CEST
        # daily at 09:00 local
        (NEW_YORK, local(NEW_YORK, 2024, 3, 9, 10, 0), "daily", local(NEW_YORK, 2024, 3, 10, 9, 0)),
        (BERLIN, local(BERLIN, 2024, 6, 5, 8, 59), "daily", local(BERLIN, 2024, 6, 5, 9, 0)),
        (BERLIN, local(BERLIN, 2024, 6, 5, 9, 0), "daily", local(BERLIN, 2024, 6, 6, 9, 0)),
        (KOLKATA, utc(2024, 6, 5, 3, 0), "daily", utc(2024, 6, 5, 3, 30)),
        # weekly on Monday at 09:00 local (2024-06-05 is a Wednesday)
        (NEW_YORK, local(NEW_YORK, 2024, 6, 5, 12, 0), "weekly", local(NEW_YORK, 2024, 6, 10, 9, 0)),
        (BERLIN, local(BERLIN, 2024, 10, 23, 12, 0), "weekly", utc(2024, 10, 28, 8, 0)),  # after the change
        (KOLKATA, local(KOLKATA, 2024, 6, 10, 9, 0), "weekly", local(KOLKATA, 2024, 6, 17, 9, 0)),
    ],
)
def test_digest_slots(tz: tzinfo, at: datetime, frequency: str, slot: datetime) -> None:
    assert next_slot(at, frequency, time(9), "MON", tz) == slot


def test_digest_slot_in_a_gap_and_immediate() -> None:
    at = local(NEW_YORK, 2024, 3, 9, 12, 0)
    assert next_slot(at, "daily", time(2, 30), "MON", NEW_YORK) == utc(2024, 3, 10, 7, 0)
    assert next_slot(at, "immediate", time(9), "MON", NEW_YORK) is None
    assert next_slot(at, "fortnightly", time(9), "MON", NEW_YORK) is None


def test_digest_keys_are_stable_per_user_category_and_slot() -> None:
    slot = utc(2024, 6, 5, 9, 0)
    key = digest_key("u1", "trading", slot)
    assert key == digest_key("u1", "trading", slot.astimezone(BERLIN))
    assert key.startswith("dg_") and "u1" not in key
    assert len({key, digest_key("u2", "trading", slot), digest_key("u1", "news", slot)}) == 3
    assert digest_key("u1", "trading", slot + timedelta(days=1)) != key
    assert digest_key("a:b", "c", slot) != digest_key("a", "b:c", slot)


ZONES = [
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",  # 30-minute DST shift
    "Asia/Kathmandu",
    "America/St_Johns",
    "Pacific/Chatham",
    "UTC",
]
instants = st.datetimes(datetime(2020, 1, 1), datetime(2030, 1, 1)).map(lambda d: d.replace(tzinfo=UTC))
clocks = st.builds(time, st.integers(0, 23), st.sampled_from([0, 15, 30, 45, 59]))


def _inside_by_wall_clock(at: datetime, start: time, end: time, days: list[str], tz: tzinfo) -> bool:
    wall = at.astimezone(tz)
    today, yesterday = WEEKDAYS[wall.weekday()], WEEKDAYS[(wall.weekday() - 1) % 7]
    if start < end:
        return today in days and start <= wall.time() < end
    return (today in days and wall.time() >= start) or (yesterday in days and wall.time() < end)


@settings(max_examples=300, deadline=None)
@given(
    at=instants,
    start=clocks,
    end=clocks,
    days=st.lists(st.sampled_from(WEEKDAYS), unique=True),
    name=st.sampled_from(ZONES),
)
def test_deliver_after_is_later_and_outside_the_window(
    at: datetime, start: time, end: time, days: list[str], name: str
) -> None:
    tz = zone(name)[0]
    until = quiet_until(at, start, end, days, tz)
    if until is None:
        return
    assert until > at
    assert until - at <= timedelta(hours=25)
    assert quiet_until(until, start, end, days, tz) is None
    assert not _inside_by_wall_clock(until, start, end, days, tz)


@settings(max_examples=300, deadline=None)
@given(
    at=instants,
    clock=clocks,
    frequency=st.sampled_from(["hourly", "daily", "weekly"]),
    weekday=st.sampled_from(WEEKDAYS),
    name=st.sampled_from(ZONES),
)
def test_slots_are_the_next_matching_local_time(
    at: datetime, clock: time, frequency: str, weekday: str, name: str
) -> None:
    tz = zone(name)[0]
    slot = next_slot(at, frequency, clock, weekday, tz)
    assert slot is not None and slot > at
    wall = slot.astimezone(tz)
    horizon = {"hourly": timedelta(hours=1), "daily": timedelta(hours=25), "weekly": timedelta(days=7, hours=1)}
    assert slot - at <= horizon[frequency]
    if frequency == "hourly":
        assert (wall.minute, wall.second) == (0, 0)
    elif wall.time() != clock:  # only a clock time inside a DST gap moves (to the end of the gap)
        assert wall.time() > clock and wall.utcoffset() != (slot - timedelta(hours=3)).astimezone(tz).utcoffset()
    if frequency == "weekly":
        assert WEEKDAYS[wall.weekday()] == weekday
