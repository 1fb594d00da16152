"""The privacy registry and the export/erasure bookkeeping audit builds on it (no server needed)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from prefd_server.audit.model import ErasureCounts
from prefd_server.audit.rules import export_document
from prefd_server.kernel.model import Subject
from prefd_server.kernel.privacy import ErasedRows, ExportPart, PrivacyRegistry


class _Participant:
    def __init__(self, name: str) -> None:
        self.name = name
        self.erased: list[tuple[str, int | None]] = []

    async def export(self, conn: Any, subject: Subject) -> ExportPart:
        return ExportPart({self.name: subject.user_id}, consent={f"{self.name}.consent": True})

    async def erase(self, conn: Any, user_id: str, pseudonym: str) -> ErasedRows:
        return ErasedRows({self.name: 1}, 2)

    def after_erase(self, user_id: str, xid: int | None) -> None:
        self.erased.append((user_id, xid))


async def test_the_registry_runs_every_participant_in_order_and_refuses_a_second_of_a_name() -> None:
    registry = PrivacyRegistry()
    first, second = _Participant("a"), _Participant("b")
    registry.register(first)
    registry.register(second)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(_Participant("a"))
    parts = await registry.export(None, Subject("u1"))
    assert [dict(p.sections) for p in parts] == [{"a": "u1"}, {"b": "u1"}]
    assert [dict(r.deleted) for r in await registry.erase(None, "u1", "erased-x")] == [{"a": 1}, {"b": 1}]
    registry.after_erase("u1", 7)
    assert first.erased == second.erased == [("u1", 7)]


def test_erasure_counts_report_overrides_and_configs_and_fold_the_rest_into_other_rows() -> None:
    erased = [ErasedRows({"overrides": 2}, 3), ErasedRows({"ai_configs": 1, "consent_records": 4}, 5)]
    counts = ErasureCounts.of(erased, changes=6, other_rows=1)
    assert (counts.overrides, counts.ai_configs, counts.changes, counts.other_rows) == (2, 1, 6, 13)
    assert counts.document() == {"overrides_deleted": 2, "ai_configs_deleted": 1, "changes_pseudonymised": 6}
    assert not ErasureCounts.of([ErasedRows()], 0, 0).any


def test_the_export_document_merges_sections_and_consent_and_refuses_a_section_twice() -> None:
    at = datetime(2024, 5, 1, tzinfo=UTC)
    parts = [ExportPart({"overrides": {}}, {"x.consent": True}), ExportPart({"usage": []}, {"y.consent": False})]
    document = export_document(Subject("u1", "o1"), at, parts, [])
    assert document == {
        "user_id": "u1",
        "org_id": "o1",
        "exported_at": at.isoformat(),
        "overrides": {},
        "usage": [],
        "consent": {"x.consent": True, "y.consent": False},
        "changes": [],
    }
    with pytest.raises(ValueError, match="filled twice"):
        export_document(Subject("u1"), at, [ExportPart({"changes": []})], [])
