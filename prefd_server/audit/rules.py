"""Pure rules of audit: the export document a user receives, assembled from the participants' parts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from prefd_server.audit.model import AuditRow
from prefd_server.kernel.model import Subject
from prefd_server.kernel.privacy import ExportPart


def export_document(
    subject: Subject, exported_at: datetime, parts: Sequence[ExportPart], history: Sequence[AuditRow]
) -> dict[str, Any]:
    """The export: who and when, each participant's sections, the consent records and the history."""
    document: dict[str, Any] = {
        "user_id": subject.user_id,
        "org_id": subject.org_id,
        "exported_at": exported_at.isoformat(),
        "consent": {},
        "changes": [row.document() for row in history],
    }
    for part in parts:
        taken = document.keys() & part.sections.keys()
        if taken:
            raise ValueError(f"export sections {sorted(taken)} are filled twice")
        document.update(part.sections)
        document["consent"].update(part.consent)
    return document
