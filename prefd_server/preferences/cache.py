"""Effective preferences from cached definitions and override layers (L1, Redis, PostgreSQL).

The scoped cache keeps each scope's overrides and prebuilt response bodies fresh by change xid
and snapshot horizon; this module adds what is particular to preferences: the definitions, the
Redis form of an override layer, and resolution through a subject's layers.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from prefd_server.kernel.bounded_cache import CacheBudget, SegmentedLru, approximate_size, bounded_cache
from prefd_server.kernel.feed_store import ChangeEvent
from prefd_server.kernel.model import ChangeKind, ResolvedValue, Scope, ScopeKind, Subject
from prefd_server.kernel.model import Layer as ResolutionLayer
from prefd_server.kernel.parts import KeyFacts
from prefd_server.kernel.redis import RedisLayers
from prefd_server.kernel.response_cache import Kept
from prefd_server.kernel.scoped_cache import Layer, LayerCodec, ScopedCache, same_layer
from prefd_server.preferences import definitions_store as definition_sql
from prefd_server.preferences import store as preference_sql
from prefd_server.preferences.model import Definition, StoredValue
from prefd_server.preferences.resolve import key_selected, resolve

Overrides = dict[str, StoredValue]
# The overrides of every cached layer that holds none (shared: never modified).
NO_OVERRIDES: Overrides = {}


# What an org base holds per value once read both ways (single and batch reads), with its wire form
# (measured with tracemalloc: about 49 KB for the 100 shipped definitions; tests/preferences/test_base_size.py).
BASE_BYTES_PER_VALUE = 490
BASE_BYTES_FIXED = 1024
# Filters whose definition selection is remembered; more clears the memo (requests choose the filters).
MAX_SELECTIONS = 256


@dataclass(slots=True, eq=False)
class OrgBase:
    """What every subject of one org whose USER layer sets none of the selected keys resolves to
    (GLOBAL <- ORG over the selected definitions), built from exactly these layer objects, and the keys
    whose values depend on the user even so (rollouts bucketed by user id). `wire` is the edge's
    serialized form of the values, built once by whoever serializes them first."""

    definitions: list[Definition]
    global_layer: Layer[Overrides]
    org_layer: Layer[Overrides] | None
    values: list[ResolvedValue]
    by_user: frozenset[str]
    wire: Any = None


@dataclass(frozen=True, slots=True)
class SubjectValues:
    """A subject's effective values as its org's base plus the values it resolves differently (`own`:
    the keys its USER layer sets and the base's user-bucketed keys), and each layer's horizon."""

    base: OrgBase
    own: dict[str, ResolvedValue]
    used: dict[Scope, int]

    def values(self) -> list[ResolvedValue]:
        """Every selected value, in definition order."""
        own = self.own
        if not own:
            return self.base.values
        return [own.get(v.key, v) for v in self.base.values]


@dataclass(frozen=True, slots=True)
class DefinitionSet:
    """Every definition, ordered by key and by key."""

    ordered: list[Definition]
    by_key: dict[str, Definition]


async def _read_definitions(conn: asyncpg.Connection) -> DefinitionSet:
    ordered = await definition_sql.all_definitions(conn)
    return DefinitionSet(ordered, {d.key: d for d in ordered})


def _overrides_to_json(overrides: Overrides) -> dict[str, list[Any]]:
    return {k: [v.value, v.version, v.updated_at.isoformat(), v.updated_by] for k, v in overrides.items()}


def _overrides_from_json(scope: Scope, doc: dict[str, list[Any]]) -> Overrides:
    return {
        key: StoredValue(scope, key, value, version, datetime.fromisoformat(at), by)
        for key, (value, version, at, by) in doc.items()
    }


def org_base(
    definitions: list[Definition], chain: Sequence[tuple[ResolutionLayer, Scope, Layer[Overrides]]]
) -> OrgBase:
    """The base of a subject's chain (its layers above USER) over `definitions`."""
    global_layer = chain[0][2]
    org_layer = chain[1][2] if len(chain) == 3 else None
    values = resolve(definitions, [(layer, scope, held.value) for layer, scope, held in chain[:-1]])
    by_user = frozenset(v.key for v in values if v.rollout is not None and v.rollout.bucket_by == "user_id")
    return OrgBase(definitions, global_layer, org_layer, values, by_user)


def subject_on_base(
    base: OrgBase,
    chain: Sequence[tuple[ResolutionLayer, Scope, Layer[Overrides]]],
    by_key: Mapping[str, Definition],
) -> SubjectValues:
    """A subject's values over its org's base: only the selected keys its USER layer sets and the base's
    user-bucketed keys are resolved again, through the whole chain. `by_key`: the selected definitions."""
    user_layer = chain[-1][2].value
    wanted = {k for k in user_layer if k in by_key} | base.by_user if user_layer else base.by_user
    own: dict[str, ResolvedValue] = {}
    if wanted:
        chosen = [by_key[k] for k in sorted(wanted)]
        own = {v.key: v for v in resolve(chosen, [(layer, scope, held.value) for layer, scope, held in chain])}
    return SubjectValues(base, own, {scope: held.xmin for _, scope, held in chain})


def base_bytes(base: OrgBase) -> int:
    """What an org base is accounted to hold in its cache."""
    return BASE_BYTES_PER_VALUE * len(base.values) + BASE_BYTES_FIXED


def overrides_size(overrides: Overrides) -> int:
    """Roughly the bytes a cached layer's overrides hold."""
    return sum(
        300 + len(key) + (len(value.value) if isinstance(value.value, str) else approximate_size(value.value))
        for key, value in overrides.items()
    )


def _facts(definition: Definition) -> KeyFacts:
    return KeyFacts(definition.key, definition.category, definition.sensitive, definition.default)


class EffectiveCache:
    """Resolves subjects from cached definitions and layers; keeps prebuilt response bodies."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: RedisLayers | None,
        budget: CacheBudget | None = None,
        read_pool: asyncpg.Pool | None = None,
    ) -> None:
        codec = LayerCodec(_overrides_to_json, _overrides_from_json)
        self._layers: ScopedCache[Overrides] = ScopedCache(
            pool,
            preference_sql.overrides,
            redis,
            codec,
            name="preferences",
            budget=budget,
            sizeof=overrides_size,
            read_now=preference_sql.overrides_now,
            empty=NO_OVERRIDES,
            read_pool=read_pool,
        )
        # (org id, key prefixes, categories) -> the org's base for that selection.
        self._bases: SegmentedLru[tuple[str, tuple[str, ...], tuple[str, ...]], OrgBase] = bounded_cache(
            "preferences.org_bases", budget, self._base_evicted
        )
        self._definitions = self._layers.snapshot_value(_read_definitions)
        self.redis = redis
        self.stats = self._layers.stats
        self._kept = self._layers.response
        # (key prefixes, categories) -> the definition set it was worked out for, and the selection.
        self._selections: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[DefinitionSet, list[Definition]]] = {}
        self._selected_key_memo: tuple[list[Definition], frozenset[str]] | None = None
        self._by_key_memo: tuple[list[Definition], dict[str, Definition]] | None = None

    # --- invalidation ------------------------------------------------------------------

    def on_changes(self, events: Sequence[ChangeEvent]) -> None:
        """Feed listener: forget everything the changes make stale."""
        self._layers.on_changes(events, ChangeKind.PREFERENCE, {ChangeKind.DEFINITION: self._definitions})

    async def prepare(self, events: Sequence[ChangeEvent]) -> None:
        """Feed preparer: read again, once, what changes to watched scopes made stale (their layers, the
        definitions), so the watchers of an ORG or GLOBAL change resolve it without a read each."""
        scopes = {e.scope for e in events if e.kind == ChangeKind.PREFERENCE}
        if any(e.kind == ChangeKind.DEFINITION for e in events):
            await self.definitions()
        if scopes:
            await self._layers.layers(sorted(scopes, key=str))

    def on_local_commit(self, scope: Scope, xid: int, redis_delete: bool = True) -> None:
        """A write of this process committed: its own reads see it at once."""
        self._layers.forget(scope, xid, redis_delete)

    def forget_all_layers(self, xid: int) -> None:
        """Drop every cached layer and response (after an erasure, whose change row hides the user id)."""
        self._layers.forget_all(xid)

    def on_local_definition_commit(self, xid: int) -> None:
        """A definition write of this process committed."""
        self._definitions.forget(xid)

    # --- reads -----------------------------------------------------------------------------

    @property
    def tick(self) -> int:
        """Grows with every invalidation; compare before and after building a response."""
        return self._layers.tick

    def response(self, key: Hashable) -> bytes | None:
        """A prebuilt response body, if one is kept for `key`. One kept in parts is joined and, being read
        again, kept whole from then on (at its whole size)."""
        kept = self._kept(key)
        if kept is None or type(kept) is bytes:
            return kept
        body = kept.body()  # type: ignore[union-attr]
        self._layers.replace_response(key, body, len(body))
        return body

    def store_response(
        self, key: Hashable, used: Mapping[Scope, int], since_tick: int, kept: Kept, size: int, org_id: str
    ) -> None:
        """Keep a response built from layers read at `used` (scope -> xmin) since `since_tick`, unless a
        change was seen after `since_tick` or a newer layer of one of its scopes was read. It shares the
        serialized parts of `org_id`'s base (its body itself, or its pieces), so it costs only `size` (what
        it holds beyond them) and goes when that base does."""
        self._layers.store_response(key, used, since_tick, kept, size, Scope(ScopeKind.ORG, org_id))

    async def definitions(self) -> list[Definition]:
        """Every definition, ordered by key (one load at a time however many callers miss)."""
        current = self._definitions.value
        if current is None:
            current = await self._definitions.get()
        return current.ordered

    async def selected(self, key_prefixes: Sequence[str], categories: Sequence[str]) -> list[Definition]:
        """The definitions the filters select, remembered per filter for the current definition set
        (at most MAX_SELECTIONS filters: the filters are the caller's, so the memory is bounded)."""
        current = self._definitions.value
        if current is None:
            current = await self._definitions.get()
        memo = (tuple(key_prefixes), tuple(categories))
        known = self._selections.get(memo)
        if known is not None and known[0] is current:
            return known[1]
        chosen = [d for d in current.ordered if key_selected(d, key_prefixes, categories)]
        if len(self._selections) >= MAX_SELECTIONS:
            self._selections.clear()
        self._selections[memo] = (current, chosen)
        return chosen

    async def definition(self, key: str) -> Definition | None:
        """One definition from the cached set."""
        current = self._definitions.value
        if current is None:
            current = await self._definitions.get()
        return current.by_key.get(key)

    async def key_facts(self, key: str) -> KeyFacts | None:
        """A key's category, sensitivity and default (the kernel's KeyCatalog)."""
        definition = await self.definition(key)
        return None if definition is None else _facts(definition)

    async def category_keys(self, category: str) -> list[KeyFacts]:
        """The facts of every key of a category, ordered by key (the kernel's KeyCatalog)."""
        return [_facts(d) for d in await self.selected((), (category,))]

    async def layers(self, scopes: Sequence[Scope]) -> dict[Scope, Layer[Overrides]]:
        """The override layer of each scope: L1, else L2, else PostgreSQL (one snapshot for all)."""
        return await self._layers.layers(scopes)

    async def resolve(
        self, subjects: Sequence[Subject], key_prefixes: Sequence[str], categories: Sequence[str]
    ) -> list[list[ResolvedValue]]:
        """Each subject's effective values from cached definitions and layers."""
        definitions = await self.selected(key_prefixes, categories)
        layers = await self._layers.layers(preference_sql.subject_scopes(subjects))
        return [
            resolve(definitions, [(layer, scope, layers[scope].value) for layer, scope in subject.layers()])
            for subject in subjects
        ]

    async def resolve_shared(
        self, subjects: Sequence[Subject], key_prefixes: Sequence[str], categories: Sequence[str]
    ) -> list[tuple[Hashable, list[ResolvedValue]]]:
        """Each subject's values with its basis: the scopes whose layers set a selected key. Subjects with
        the same basis share one resolution (an org's users without overrides of their own resolve once),
        unless a rollout is among the values (then the basis names the subject too)."""
        definitions = await self.selected(key_prefixes, categories)
        keys = self._selected_keys(definitions)
        layers = await self._layers.layers(preference_sql.subject_scopes(subjects))
        touches: dict[Scope, bool] = {}
        shared: dict[Hashable, list[ResolvedValue]] = {}
        bucketed: set[Hashable] = set()
        found: list[tuple[Hashable, list[ResolvedValue]]] = []
        for subject in subjects:
            chain = [(layer, scope, layers[scope].value) for layer, scope in subject.layers()]
            basis = []
            for _, scope, overrides in chain:
                touched = touches.get(scope)
                if touched is None:
                    touched = touches[scope] = not keys.isdisjoint(overrides)
                if touched:
                    basis.append(scope)
            layers_key = tuple(basis)
            # With a rollout among the values each subject gets its own variants: the key names it.
            key: Hashable = (layers_key, subject.user_id, subject.org_id) if layers_key in bucketed else layers_key
            values = shared.get(key)
            if values is None:
                values = resolve(definitions, chain)
                if key is layers_key and any(v.rollout is not None for v in values):
                    bucketed.add(layers_key)
                    key = (layers_key, subject.user_id, subject.org_id)
                shared[key] = values
            found.append((key, values))
        return found

    def _selected_by_key(self, definitions: list[Definition]) -> dict[str, Definition]:
        """The definitions of a selection by key (remembered for the last selection asked for)."""
        memo = self._by_key_memo
        if memo is None or memo[0] is not definitions:
            memo = self._by_key_memo = (definitions, {d.key: d for d in definitions})
        return memo[1]

    def _selected_keys(self, definitions: list[Definition]) -> frozenset[str]:
        """The keys of a selection (remembered for the last selection asked for)."""
        memo = self._selected_key_memo
        if memo is None or memo[0] is not definitions:
            memo = self._selected_key_memo = (definitions, frozenset(d.key for d in definitions))
        return memo[1]

    async def resolve_subject(
        self, subject: Subject, key_prefixes: Sequence[str], categories: Sequence[str]
    ) -> tuple[list[ResolvedValue], dict[Scope, int]]:
        """One subject's effective values, and the horizon (xmin) of each layer they came from."""
        definitions = await self.selected(key_prefixes, categories)
        layers = await self._layers.layers([scope for _, scope in subject.layers()])
        values = resolve(definitions, [(layer, scope, layers[scope].value) for layer, scope in subject.layers()])
        return values, {scope: layer.xmin for scope, layer in layers.items()}

    async def subject_values(
        self, subjects: Sequence[Subject], key_prefixes: Sequence[str], categories: Sequence[str]
    ) -> list[SubjectValues]:
        """Each subject's values as its org's base (resolved once per org and selection, kept while its
        GLOBAL and ORG layers and the definitions stay) plus what only the subject's USER layer and
        user-bucketed rollouts change; every layer from the cache, misses read together."""
        definitions = await self.selected(key_prefixes, categories)
        layers = await self._layers.layers(preference_sql.subject_scopes(subjects))
        by_key = self._selected_by_key(definitions)
        selection = (tuple(key_prefixes), tuple(categories))
        found = []
        for subject in subjects:
            chain = [(layer, scope, layers[scope]) for layer, scope in subject.layers()]
            base = self._base(subject.org_id, selection, definitions, chain)
            found.append(subject_on_base(base, chain, by_key))
        return found

    def _base(
        self,
        org_id: str,
        selection: tuple[tuple[str, ...], tuple[str, ...]],
        definitions: list[Definition],
        chain: list[tuple[ResolutionLayer, Scope, Layer[Overrides]]],
    ) -> OrgBase:
        """The org's base for a selection (key prefixes, categories): the kept one if built from these very
        layers and definitions, else resolved now (no await between the lookup and the store: concurrent
        misses build it once)."""
        memo = (org_id, *selection)
        global_layer = chain[0][2]
        org_layer = chain[1][2] if org_id else None
        base = self._bases.get(memo)
        if (
            base is not None
            and base.definitions is definitions
            and same_layer(base.global_layer, global_layer)
            and same_layer(base.org_layer, org_layer)
        ):
            return base
        if base is not None:  # replaced: responses sharing its body go with it
            self._layers.drop_responses(Scope(ScopeKind.ORG, org_id))
        base = org_base(definitions, chain)
        self._bases.put(memo, base, base_bytes(base))
        return base

    def _base_evicted(self, memo: tuple[str, tuple[str, ...], tuple[str, ...]], base: OrgBase) -> None:
        """An org base left the cache: so do the responses that share its body (kept under its org)."""
        self._layers.drop_responses(Scope(ScopeKind.ORG, memo[0]))

    async def resolve_key(
        self, subject: Subject, key: str, shared: dict[Hashable, Any] | None = None
    ) -> ResolvedValue | None:
        """The subject's effective value of one key; None if the key is not defined.

        `shared`: a memo for the many watchers of one change. The subjects of an org whose own layer does
        not hold the key get the same value (unless a rollout assigned it per subject): it is resolved once.
        """
        definition = await self.definition(key)
        if definition is None:
            return None
        user = Scope(ScopeKind.USER, subject.user_id)
        memo = ("resolve_key", key, subject.org_id, definition.version)
        if shared is not None:
            own = self._layers.peek(user)
            if own is not None and key not in own.value:
                known: ResolvedValue | None = shared.get(memo)
                if known is not None:
                    return known
        layers = await self._layers.layers([scope for _, scope in subject.layers()])
        resolved = resolve([definition], [(layer, scope, layers[scope].value) for layer, scope in subject.layers()])[0]
        if shared is not None and resolved.rollout is None and key not in layers[user].value:
            shared.setdefault(memo, resolved)
        return resolved

    async def close(self) -> None:
        """Stop background Redis writes."""
        await self._layers.close()
