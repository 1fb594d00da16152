"""Builds the audit domain on the kernel: history, export and erasure through the privacy registry, rollback."""

from __future__ import annotations

from prefd_server.audit.service import AuditService
from prefd_server.audit.store import HistoryStore
from prefd_server.audit.user_data_store import UserDataStore
from prefd_server.kernel.parts import Domain, Kernel
from prefd_server.kernel.restore import RESTORER
from prefd_server.settings import Settings


async def register(kernel: Kernel, settings: Settings) -> Domain:
    """Audit reads every domain's history; rollback restores through the restorer a domain provides."""
    user_data = UserDataStore(kernel.pool, kernel.privacy, kernel.commits)
    service = AuditService(kernel, HistoryStore(kernel.pool), user_data, kernel.provisions.get(RESTORER))
    return Domain("audit", [service])
