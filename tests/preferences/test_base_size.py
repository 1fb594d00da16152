"""An org base is accounted in its cache for what it holds: its values and its wire form in both layouts."""

from __future__ import annotations

import tracemalloc
from datetime import UTC, datetime

from prefd_server.kernel.model import GLOBAL_SCOPE, Scope, ScopeKind, Subject
from prefd_server.kernel.model import Layer as ResolutionLayer
from prefd_server.kernel.scoped_cache import Layer
from prefd_server.preferences.cache import base_bytes, org_base, subject_on_base
from prefd_server.preferences.catalog import load_catalog
from prefd_server.preferences.effective_convert import subject_preferences, wire_base
from prefd_server.preferences.model import StoredValue

_WHEN = datetime(2026, 1, 2, tzinfo=UTC)
BASES = 100


def _chain(org_id: str) -> list[tuple[ResolutionLayer, Scope, Layer[dict[str, StoredValue]]]]:
    org = Scope(ScopeKind.ORG, org_id)
    overrides = {
        key: StoredValue(org, key, value, 1, _WHEN, "admin")
        for key, value in (("locale.timezone", "Europe/Berlin"), ("display.theme", "dark"))
    }
    user = Scope(ScopeKind.USER, f"{org_id}-user")
    return [
        (ResolutionLayer.GLOBAL, GLOBAL_SCOPE, Layer({}, 1)),
        (ResolutionLayer.ORG, org, Layer(overrides, 1)),
        (ResolutionLayer.USER, user, Layer({}, 1)),
    ]


def test_an_org_base_read_both_ways_holds_about_what_it_is_accounted_for() -> None:
    definitions = list(load_catalog().definitions)
    chains = [_chain(f"org{n}") for n in range(BASES)]
    by_key = {d.key: d for d in definitions}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        bases = [org_base(definitions, chain) for chain in chains]
        for base, chain in zip(bases, chains, strict=True):
            wire_base(base)  # GetEffectivePreferences's layout
            subject = Subject(chain[2][1].id, chain[1][1].id)
            subject_preferences(subject, subject_on_base(base, chain, by_key))  # the batch layout
        held = (tracemalloc.get_traced_memory()[0] - before) / BASES
    finally:
        tracemalloc.stop()
    accounted = base_bytes(bases[0])
    # Never more than accounted (a budget in bytes holds), and not so much less that the cache keeps
    # far fewer bases than it could.
    assert 0.8 * accounted <= held <= accounted, (held, accounted)
