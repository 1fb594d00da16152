"""The history and feed queries walk an index in feed order: no query sorts the change table.

A sort over `changes` is what turns a first page or a resumed watch into a scan of the whole table
at a million rows; with sorting disabled the planner still sorts when no index gives the order, so a
Sort node in these plans is the regression.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from prefd_server.audit.store import ChangeFilter, list_changes_query
from prefd_server.kernel import feed_store as feed_sql
from prefd_server.kernel.cursor import FeedCursor
from prefd_server.kernel.model import Scope, ScopeKind

HORIZON = 2**40
NOW = datetime.now(UTC)


def _nodes(plan: dict[str, Any]) -> list[str]:
    found = [plan["Node Type"] + (f" on {plan['Index Name']}" if "Index Name" in plan else "")]
    for child in plan.get("Plans", []):
        found.extend(_nodes(child))
    return found


async def _plan_nodes(db: asyncpg.Connection, sql: str, *params: Any) -> list[str]:
    async with db.transaction():
        await db.execute("SET LOCAL enable_sort = off")
        await db.execute("SET LOCAL enable_seqscan = off")
        plan = await db.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *params)
    document = json.loads(plan) if isinstance(plan, str) else plan
    return _nodes(document[0]["Plan"])


ALICE = Scope(ScopeKind.USER, "alice")
# Each filter and the index whose order it walks.
FILTERS = {
    "everything": (ChangeFilter(None, "", (), "", None, None), "changes_feed"),
    "one kind": (ChangeFilter(None, "", ("preference",), "", None, None), "changes_feed"),
    "one scope": (ChangeFilter(ALICE, "", (), "", None, None), "changes_scope_feed"),
    "scope and prefix": (ChangeFilter(ALICE, "display.", (), "", None, None), "changes_scope_feed"),
    "one actor": (ChangeFilter(None, "", (), "ops-admin", None, None), "changes_actor_feed"),
    "time range": (ChangeFilter(None, "", (), "", NOW - timedelta(days=1), NOW), "changes_feed"),
}


@pytest.mark.parametrize("name", FILTERS)
@pytest.mark.parametrize("newest_first", [False, True])
@pytest.mark.parametrize("after", [None, FeedCursor(1000, 5)])
async def test_list_changes_pages_are_index_walks(db, name: str, newest_first: bool, after) -> None:
    where, index = FILTERS[name]
    sql, params = list_changes_query(where, HORIZON, after, newest_first, 101)
    nodes = await _plan_nodes(db, sql, *params)
    assert "Sort" not in nodes and "Incremental Sort" not in nodes, nodes
    if after is None:
        # From the start of the feed the filter's own index is the cheap walk; with a selective
        # cursor bound the planner may as well walk the feed index, in the same order.
        assert any(node.endswith(f" on {index}") for node in nodes), nodes


async def test_feed_reads_are_index_walks(db) -> None:
    after_nodes = await _plan_nodes(db, feed_sql.READ_AFTER, "0", 0, str(HORIZON), 500)
    range_nodes = await _plan_nodes(
        db, feed_sql.READ_RANGE, "0", 0, str(HORIZON), 0, ["USER"], ["alice"], ["display.%"], 500
    )
    for nodes in (after_nodes, range_nodes):
        assert "Sort" not in nodes and "Incremental Sort" not in nodes, nodes
