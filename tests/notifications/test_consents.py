"""The consent ledger on the test server's database: lifecycle, expiry, change rows, append-only rows,
the cache of current consents, and the ledger's part in export and erasure."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from prefd_server.app import App
from prefd_server.kernel.commits import LocalCommits
from prefd_server.kernel.db import snapshot
from prefd_server.kernel.errors import Code, PrefdError, ValidationFailed
from prefd_server.kernel.feed_store import ChangeEvent, current_xid
from prefd_server.kernel.model import CallInfo, ChangeKind, Scope, ScopeKind, Subject
from prefd_server.kernel.privacy import pseudonym_of
from prefd_server.notifications import consent_store
from prefd_server.notifications.consents import ConsentLedger, ConsentNotGranted
from prefd_server.notifications.model import ConsentEntry, ConsentStatus, LegalBasis
from prefd_server.notifications.privacy import ConsentPrivacy
from tests.helpers.auth import unique

CALL = CallInfo("admin-1", peer="ipv4:10.0.0.1:5000", user_agent="tests/1.0", request_id="r-1")


@pytest.fixture
def ledger(app: App) -> ConsentLedger:
    assert app.kernel is not None
    return ConsentLedger(app.kernel.pool, app.kernel.commits)


async def _grant(ledger: ConsentLedger, user_id: str, purpose: str, **changes: object) -> ConsentEntry:
    fields: dict[str, object] = {
        "legal_basis": LegalBasis.CONSENT,
        "source": "signup_form",
        "notice_version": "v3",
        "proof_reference": "doc-42",
        "expires_at": None,
        "call": CALL,
        **changes,
    }
    return await ledger.grant(user_id, purpose, **fields)  # type: ignore[arg-type]


async def test_a_purpose_goes_granted_withdrawn_and_granted_again(ledger: ConsentLedger) -> None:
    alice = unique("alice")
    granted = await _grant(ledger, alice, "marketing_email")
    assert (granted.status, granted.actor, granted.source, granted.proof_reference) == (
        ConsentStatus.GRANTED,
        "admin-1",
        "signup_form",
        "doc-42",
    )
    assert granted.entry_id > 0 and granted.granted_at == granted.recorded_at
    assert (await ledger.current(alice))["marketing_email"] == granted

    withdrawn = await ledger.withdraw(alice, "marketing_email", "settings_page", CALL)
    assert withdrawn.status is ConsentStatus.WITHDRAWN and withdrawn.entry_id > granted.entry_id
    assert withdrawn.granted_at == granted.granted_at and withdrawn.withdrawn_at == withdrawn.recorded_at
    assert (withdrawn.source, withdrawn.notice_version) == ("settings_page", "v3")
    assert (await ledger.current(alice))["marketing_email"].status is ConsentStatus.WITHDRAWN

    again = await _grant(ledger, alice, "marketing_email", notice_version="v4")
    current = await ledger.current(alice)
    assert current == {"marketing_email": again} and again.notice_version == "v4"
    history = await ledger.history(alice, "", 0, 100)
    assert [e.status for e in history] == [ConsentStatus.GRANTED, ConsentStatus.WITHDRAWN, ConsentStatus.GRANTED]
    assert await ledger.history(alice, "marketing_email", history[0].entry_id, 1) == [history[1]]
    assert await ledger.history(alice, "research", 0, 100) == []


async def test_a_grant_expires_at_its_expiry_and_an_expired_grant_cannot_be_withdrawn(
    app: App, ledger: ConsentLedger
) -> None:
    bob = unique("bob")
    expires = datetime.now(UTC) + timedelta(minutes=5)
    entry = (await ledger.current_many([(await _grant(ledger, bob, "research", expires_at=expires)).user_id]))[bob]
    assert entry["research"].expires_at == expires
    assert entry["research"].status_at(datetime.now(UTC)) is ConsentStatus.GRANTED
    assert entry["research"].status_at(expires + timedelta(seconds=1)) is ConsentStatus.EXPIRED

    # A grant recorded when its expiry had passed (as if time went by): not granted any more.
    assert app.kernel is not None
    await consent_store.append(
        app.kernel.pool,
        bob,
        "product_updates",
        lambda _previous, now: ConsentEntry(
            bob, "product_updates", LegalBasis.CONSENT, ConsentStatus.GRANTED, granted_at=now, expires_at=now
        ),
        CALL,
    )
    with pytest.raises(ConsentNotGranted) as err:
        await ledger.withdraw(bob, "product_updates", "", CALL)
    assert (err.value.code, err.value.reason) == (Code.FAILED_PRECONDITION, "CONSENT_NOT_GRANTED")


async def test_withdrawing_what_was_never_granted_or_already_withdrawn_fails_and_writes_nothing(
    ledger: ConsentLedger, db: asyncpg.Connection
) -> None:
    carol = unique("carol")
    with pytest.raises(PrefdError) as err:
        await ledger.withdraw(carol, "marketing_sms", "", CALL)
    assert (err.value.code, err.value.reason) == (Code.FAILED_PRECONDITION, "CONSENT_NOT_GRANTED")
    await _grant(ledger, carol, "marketing_sms")
    await ledger.withdraw(carol, "marketing_sms", "", CALL)
    with pytest.raises(ConsentNotGranted):
        await ledger.withdraw(carol, "marketing_sms", "", CALL)
    assert await db.fetchval("SELECT count(*) FROM consent_ledger WHERE user_id = $1", carol) == 2
    assert await db.fetchval("SELECT count(*) FROM changes WHERE scope_id = $1", carol) == 2


@pytest.mark.parametrize(
    ("user_id", "purpose", "changes", "field"),
    [
        ("u", "", {}, "purpose"),
        ("u", "Marketing", {}, "purpose"),
        ("u", "a" * 129, {}, "purpose"),
        ("u", "with space", {}, "purpose"),
        ("", "research", {}, "user_id"),
        ("u", "research", {"source": "s" * 129}, "source"),
        ("u", "research", {"notice_version": "n" * 129}, "notice_version"),
        ("u", "research", {"proof_reference": "p" * 513}, "proof_reference"),
        ("u", "research", {"expires_at": datetime.now(UTC) - timedelta(seconds=1)}, "expires_at"),
        ("u", "research", {"expires_at": datetime(2999, 1, 1)}, "expires_at"),  # no timezone
    ],
)
async def test_malformed_grants_are_refused_field_by_field_and_write_nothing(
    ledger: ConsentLedger, db: asyncpg.Connection, user_id: str, purpose: str, changes: dict[str, object], field: str
) -> None:
    before = await db.fetchval("SELECT count(*) FROM consent_ledger")
    with pytest.raises(ValidationFailed) as err:
        await _grant(ledger, user_id, purpose, **changes)
    assert [v.field for v in err.value.violations] == [field]
    assert await db.fetchval("SELECT count(*) FROM consent_ledger") == before


async def test_an_unknown_purpose_is_refused_when_the_ledger_knows_its_purposes(app: App) -> None:
    assert app.kernel is not None

    async def purposes() -> Sequence[str]:
        return ["trading_alerts"]

    ledger = ConsentLedger(app.kernel.pool, LocalCommits(), purposes)
    dave = unique("dave")
    assert (await _grant(ledger, dave, "trading_alerts")).status is ConsentStatus.GRANTED
    assert (await _grant(ledger, dave, "research")).status is ConsentStatus.GRANTED  # a fixed purpose
    with pytest.raises(ValidationFailed) as err:
        await _grant(ledger, dave, "lottery")
    assert [v.field for v in err.value.violations] == ["purpose"]


async def test_each_entry_is_written_with_its_consent_change_row_in_one_transaction(
    ledger: ConsentLedger, db: asyncpg.Connection
) -> None:
    erin = unique("erin")
    granted = await _grant(ledger, erin, "product_updates")
    withdrawn = await ledger.withdraw(erin, "product_updates", "app", CALL)
    rows = await db.fetch(
        """SELECT l.id, l.change_xid = c.xid AS same_transaction, c.kind, c.scope_kind, c.scope_id, c.key,
                  c.old_value, c.new_value, c.version, c.actor, c.peer, c.user_agent, c.request_id
           FROM consent_ledger l JOIN changes c ON c.id = l.id WHERE l.user_id = $1 ORDER BY l.id""",
        erin,
    )
    assert [r["id"] for r in rows] == [granted.entry_id, withdrawn.entry_id]
    for row in rows:
        assert row["same_transaction"]
        assert (row["kind"], row["scope_kind"], row["scope_id"], row["key"]) == (
            "consent",
            "USER",
            erin,
            "consent/product_updates",
        )
        assert (row["actor"], row["peer"], row["user_agent"], row["request_id"]) == (
            "admin-1",
            "ipv4:10.0.0.1:5000",
            "tests/1.0",
            "r-1",
        )
        assert erin not in str(row["new_value"])  # the user is the change row's scope, which erasure rewrites
    assert [r["version"] for r in rows] == [1, 2]
    assert rows[0]["old_value"] is None and rows[1]["old_value"] == rows[0]["new_value"]
    assert rows[0]["new_value"]["status"] == "granted" and rows[1]["new_value"]["status"] == "withdrawn"
    assert rows[1]["new_value"]["withdrawn_at"] == withdrawn.withdrawn_at.isoformat()  # type: ignore[union-attr]


async def test_the_database_refuses_update_and_delete_of_ledger_rows(
    ledger: ConsentLedger, db: asyncpg.Connection
) -> None:
    frank = unique("frank")
    await _grant(ledger, frank, "research")
    for statement in (
        "UPDATE consent_ledger SET status = 'withdrawn'",
        "DELETE FROM consent_ledger",
        "TRUNCATE consent_ledger",
    ):
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await db.execute(statement)
    assert await db.fetchval("SELECT status FROM consent_ledger WHERE user_id = $1", frank) == "granted"


async def test_current_consents_are_served_from_memory_and_forgotten_on_every_write(
    app: App, ledger: ConsentLedger
) -> None:
    assert app.kernel is not None
    grace = unique("grace")
    assert await ledger.current(grace) == {}
    cached = await ledger.current_many([grace, grace])
    assert cached == {grace: {}}
    granted = await _grant(ledger, grace, "marketing_email")
    assert await ledger.current(grace) == {"marketing_email": granted}  # this process's commit, at once
    assert (await ledger.current_many([grace]))[grace] is await ledger.current(grace)  # from memory

    # Another process's write reaches this process's cache through the feed.
    seen = asyncio.Event()

    def on_changes(events: Sequence[ChangeEvent]) -> None:
        ledger.on_changes(events)
        if any(e.kind is ChangeKind.CONSENT and e.scope.id == grace for e in events):
            seen.set()

    app.kernel.feed.add_listener(on_changes)
    other = ConsentLedger(app.kernel.pool, LocalCommits(app.kernel.feed.wake))
    withdrawn = await other.withdraw(grace, "marketing_email", "", CALL)
    await asyncio.wait_for(seen.wait(), timeout=10)
    assert await ledger.current(grace) == {"marketing_email": withdrawn}


async def test_export_holds_the_ledger_and_granted_purposes_and_erasure_pseudonymises_it(
    app: App, ledger: ConsentLedger, db: asyncpg.Connection
) -> None:
    assert app.kernel is not None
    pool = app.kernel.pool
    heidi = unique("heidi")
    own_call = replace(CALL, actor=heidi)
    await _grant(ledger, heidi, "marketing_email", call=own_call)
    await _grant(ledger, heidi, "research", legal_basis=LegalBasis.LEGITIMATE_INTERESTS)
    await ledger.withdraw(heidi, "research", "settings_page", own_call)
    participant = ConsentPrivacy()
    assert participant.name == "consents"

    async with snapshot(pool) as snap:
        part = await participant.export(snap.conn, Subject(heidi))
    ledger_rows = part.sections["consents"]
    assert [(r["purpose"], r["status"], r["actor"]) for r in ledger_rows] == [
        ("marketing_email", "granted", heidi),
        ("research", "granted", "admin-1"),
        ("research", "withdrawn", heidi),
    ]
    assert ledger_rows[1]["legal_basis"] == "legitimate_interests" and ledger_rows[0]["peer"] == CALL.peer
    assert list(part.consent) == ["consent/marketing_email"]
    assert part.consent["consent/marketing_email"]["status"] == "granted"

    key = await db.fetchval("SELECT pseudonym_key FROM installation")
    alias = pseudonym_of(key, heidi)
    async with pool.acquire() as conn, conn.transaction():
        erased = await participant.erase(conn, heidi, alias)
        xid = await current_xid(conn)
    app.kernel.commits.committed(ChangeKind.ERASURE, Scope(ScopeKind.USER, heidi), xid)
    participant.after_erase(heidi, xid)
    assert (dict(erased.deleted), erased.other) == ({}, 3)
    assert await db.fetchval("SELECT count(*) FROM consent_ledger WHERE user_id = $1 OR actor = $1", heidi) == 0
    kept = await db.fetch("SELECT user_id, actor, proof_reference FROM consent_ledger WHERE user_id = $1", alias)
    assert [(r["actor"], r["proof_reference"]) for r in kept] == [(alias, "doc-42"), ("admin-1", "doc-42"), (alias, "")]
    assert await ledger.current(heidi) == {}
    assert set(await ledger.current(alias)) == {"marketing_email", "research"}
