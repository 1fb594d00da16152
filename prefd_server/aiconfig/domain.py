"""Builds the AI configuration domain on the kernel: key sealing, the env layer, cache, store and service."""

from __future__ import annotations

from prefd_server.aiconfig.cache import AIConfigCache
from prefd_server.aiconfig.model import env_layer
from prefd_server.aiconfig.privacy import AIConfigPrivacy
from prefd_server.aiconfig.secretbox import SecretBox
from prefd_server.aiconfig.service import AIConfigService
from prefd_server.aiconfig.writes import AIConfigStore
from prefd_server.kernel.model import ChangeKind
from prefd_server.kernel.parts import Domain, Kernel
from prefd_server.settings import Settings


async def register(kernel: Kernel, settings: Settings) -> Domain:
    """Hook the cache to the feed and to local commits, and take part in export and erasure."""
    box = SecretBox(settings)
    api_key = settings.ai_api_key.get_secret_value() if settings.ai_api_key else None
    env = env_layer(settings.ai_model, settings.ai_temperature, settings.ai_max_tokens, api_key)
    cache = AIConfigCache(kernel.pool, box, env, kernel.caches)
    kernel.feed.add_listener(cache.on_changes)
    kernel.commits.add_listener(ChangeKind.AI_CONFIG, cache.on_local_commit)
    kernel.commits.add_listener(ChangeKind.ERASURE, cache.on_local_commit)
    kernel.commits.add_listener(ChangeKind.AI_MODEL, lambda _scope, xid: cache.on_local_catalog_commit(xid))
    kernel.privacy.register(AIConfigPrivacy(kernel.redis))
    store = AIConfigStore(kernel.pool, box, env, kernel.commits)
    return Domain("aiconfig", [AIConfigService(kernel, store, cache, settings.watch_progress_interval_s)])
