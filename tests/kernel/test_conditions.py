"""Conditions on event data: every operator, absent and nested paths, and malformed conditions (pure)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefd_server.kernel.conditions import MAX_CONDITION_PATHS, condition_problems, conditions_met, path_problem

DATA = {
    "loss_amount": 1500.0,
    "symbol": "AAPL",
    "flags": ["margin", "overnight"],
    "active": True,
    "count": 0,
    "nothing": None,
    "order": {"side": "SELL", "venue": {"mic": "XNAS"}},
}


@pytest.mark.parametrize(
    ("conditions", "met"),
    [
        ({"loss_amount": {"min": 1000}}, True),
        ({"loss_amount": {"min": 1500}}, True),  # inclusive
        ({"loss_amount": {"min": 1500.5}}, False),
        ({"loss_amount": {"max": 1500}}, True),
        ({"loss_amount": {"max": 1499}}, False),
        ({"loss_amount": {"min": 1000, "max": 2000}}, True),
        ({"symbol": {"equals": "AAPL"}}, True),
        ({"symbol": {"equals": "aapl"}}, False),
        ({"count": {"equals": 0}}, True),
        ({"count": {"equals": False}}, False),  # a bool equals only a bool
        ({"active": {"equals": True}}, True),
        ({"active": {"equals": 1}}, False),
        ({"nothing": {"equals": None}}, True),
        ({"symbol": {"not_equals": "MSFT"}}, True),
        ({"symbol": {"not_equals": "AAPL"}}, False),
        ({"symbol": {"in": ["AAPL", "MSFT"]}}, True),
        ({"symbol": {"in": ["MSFT"]}}, False),
        ({"loss_amount": {"in": [1500]}}, True),  # Struct numbers are doubles
        ({"symbol": {"contains": "AP"}}, True),
        ({"symbol": {"contains": "X"}}, False),
        ({"flags": {"contains": "margin"}}, True),
        ({"flags": {"contains": "marg"}}, False),  # a list contains items, not substrings
        ({"loss_amount": {"contains": "1"}}, False),
        ({"symbol": {"exists": True}}, True),
        ({"symbol": {"exists": False}}, False),
        ({"missing": {"exists": False}}, True),
        ({"missing": {"exists": True}}, False),
        ({"nothing": {"exists": True}}, True),  # null is present
        ({"missing": {"not_equals": "x"}}, False),  # absent fails everything but exists: false
        ({"order.side": {"equals": "SELL"}}, True),
        ({"order.venue.mic": {"in": ["XNAS", "XNYS"]}}, True),
        ({"order.side.deeper": {"exists": True}}, False),
        ({"symbol": {"min": 1}}, False),  # not a number
        ({"loss_amount": {"min": 1000}, "symbol": {"equals": "MSFT"}}, False),  # all must hold
        ({}, True),
    ],
)
def test_each_operator(conditions: dict[str, Any], met: bool) -> None:
    assert condition_problems(conditions) == []
    assert conditions_met(conditions, DATA)[0] is met


def test_the_first_failure_is_said_in_words() -> None:
    met, why = conditions_met({"loss_amount": {"min": 1000}}, {"loss_amount": 500})
    assert not met
    assert why == "loss_amount = 500 is below min 1000"
    assert conditions_met({"x": {"equals": 1}}, {}) == (False, "x is absent (equals 1)")
    assert conditions_met({"loss_amount": {"min": 1}}, DATA) == (True, "conditions met on 1 path(s)")


@pytest.mark.parametrize(
    "path",
    ["", ".a", "a.", "a..b", "1abc", "a-b", "a b", "a.b.c.d.e.f.g.h.i", "ä", "a.$where"],
)
def test_malformed_paths_are_problems_and_never_met(path: str) -> None:
    conditions = {path: {"exists": False}}
    problems = condition_problems(conditions)
    assert len(problems) == 1
    assert "path" in problems[0] or "segments" in problems[0]
    met, why = conditions_met(conditions, DATA)
    assert not met
    assert why.startswith("malformed condition")


def test_good_paths() -> None:
    for path in ("a", "_private", "a.b.c.d.e.f.g.h", "loss_amount", "A1._b2"):
        assert path_problem(path) is None, path


@pytest.mark.parametrize(
    ("conditions", "fragment"),
    [
        ([], "must be an object"),
        ({"x": 5}, "non-empty object"),
        ({"x": {}}, "non-empty object"),
        ({"x": {"gt": 1}}, "unknown operator 'gt'"),
        ({"x": {"min": "1"}}, "x.min: must be a finite number"),
        ({"x": {"max": True}}, "x.max: must be a finite number"),
        ({"x": {"min": float("nan")}}, "x.min: must be a finite number"),
        ({"x": {"exists": "yes"}}, "x.exists: must be a bool"),
        ({"x": {"in": "AAPL"}}, "x.in: must be a non-empty list"),
        ({"x": {"in": []}}, "x.in: must be a non-empty list"),
        ({"x": {"in": [[1]]}}, "x.in: items must be"),
        ({"x": {"equals": {"a": 1}}}, "x.equals: must be a string"),
        ({"x": {"contains": ["a"]}}, "x.contains: must be a string"),
        ({"x": {"min": 5, "max": 1}}, "min 5 is above max 1"),
        ({f"p{i}": {"exists": True} for i in range(MAX_CONDITION_PATHS + 1)}, f"at most {MAX_CONDITION_PATHS} paths"),
    ],
)
def test_malformed_conditions(conditions: Any, fragment: str) -> None:
    problems = condition_problems(conditions)
    assert any(fragment in problem for problem in problems), problems
    assert conditions_met(conditions, DATA)[0] is False


def test_at_most_64_paths_is_fine() -> None:
    conditions = {f"p{i}": {"exists": False} for i in range(MAX_CONDITION_PATHS)}
    assert condition_problems(conditions) == []
    assert conditions_met(conditions, DATA)[0] is True


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)


@given(conditions=json_values, data=json_values)
def test_never_raises(conditions: Any, data: Any) -> None:
    met, why = conditions_met(conditions, data)
    assert isinstance(met, bool) and why
    assert isinstance(condition_problems(conditions), list)


@given(value=st.floats(allow_nan=False, allow_infinity=False), low=st.integers(-1000, 1000))
def test_min_agrees_with_comparison(value: float, low: int) -> None:
    assert conditions_met({"v": {"min": low}}, {"v": value})[0] is (value >= low)
