"""Builds the preferences domain on the kernel: shipped definitions, cache, reader, writer and service."""

from __future__ import annotations

import logging

from prefd_server.kernel.model import CallInfo, ChangeKind
from prefd_server.kernel.parts import CACHE_FIGURES, EFFECTIVE_VALUES, KEY_CATALOG, Domain, Kernel
from prefd_server.kernel.restore import RESTORER
from prefd_server.kernel.value_checks import VALUE_CHECKS, ValueChecks
from prefd_server.preferences.cache import EffectiveCache
from prefd_server.preferences.catalog import load_catalog
from prefd_server.preferences.notification_checks import add_notification_checks
from prefd_server.preferences.privacy import PreferencePrivacy
from prefd_server.preferences.reads import PreferenceReader
from prefd_server.preferences.restore import PreferenceRestorer
from prefd_server.preferences.service import PreferencesService
from prefd_server.preferences.template_book import TemplateBook
from prefd_server.preferences.template_service import TemplateService
from prefd_server.preferences.writes import PreferenceWriter, install_definitions
from prefd_server.settings import Settings

log = logging.getLogger(__name__)


async def register(kernel: Kernel, settings: Settings) -> Domain:
    """Install the shipped definitions, hook the cache to the feed and to local commits, and provide
    the scope restorer (audit's rollback), the cache figures (the metrics endpoint), the key catalog
    (statistics) and the value checks every write runs (domains registered later add theirs)."""
    catalog = load_catalog(settings.definitions_file)
    added = await install_definitions(kernel.pool, catalog.definitions, CallInfo(actor="prefd:catalog"))
    if added:
        log.info("installed %d shipped definitions", len(added))
    cache = EffectiveCache(kernel.pool, kernel.redis, kernel.caches, kernel.read_pool)
    kernel.feed.add_listener(cache.on_changes)
    kernel.feed.add_preparer(cache.prepare)
    kernel.commits.add_listener(ChangeKind.PREFERENCE, cache.on_local_commit)
    kernel.commits.add_listener(ChangeKind.ERASURE, cache.on_local_commit)
    kernel.commits.add_listener(ChangeKind.DEFINITION, lambda _scope, xid: cache.on_local_definition_commit(xid))
    checks = ValueChecks()
    add_notification_checks(checks)
    kernel.provisions.provide(VALUE_CHECKS, checks)
    writer = PreferenceWriter(kernel.pool, catalog.rules, kernel.commits, checks)
    kernel.privacy.register(PreferencePrivacy())
    kernel.provisions.provide(RESTORER, PreferenceRestorer(writer))
    kernel.provisions.provide(CACHE_FIGURES, cache.stats)
    kernel.provisions.provide(EFFECTIVE_VALUES, cache)
    kernel.provisions.provide(KEY_CATALOG, cache)
    service = PreferencesService(
        kernel, PreferenceReader(kernel.pool), writer, cache, settings.watch_progress_interval_s
    )

    async def stop(_grace_s: float) -> None:
        await cache.close()

    templates = TemplateService(TemplateBook(kernel.pool, writer), kernel.tokens)
    return Domain("preferences", [service, templates], stop)
