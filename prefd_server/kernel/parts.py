"""What a domain is built from (the kernel's shared parts) and what it hands back when it registers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

import asyncpg

from prefd_server.kernel.bounded_cache import CacheBudget
from prefd_server.kernel.commits import LocalCommits
from prefd_server.kernel.feed import FeedReader
from prefd_server.kernel.model import JsonValue, ResolvedValue, Subject
from prefd_server.kernel.privacy import PrivacyRegistry
from prefd_server.kernel.redis import RedisLayers
from prefd_server.kernel.tokens import TokenKey

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Slot(Generic[T]):
    """A named, typed place one domain fills and another reads, so neither imports the other."""

    name: str


class Provisions:
    """The filled slots: preferences provides the scope restorer that audit's rollback uses."""

    def __init__(self) -> None:
        self._values: dict[Slot[Any], Any] = {}

    def provide(self, slot: Slot[T], value: T) -> None:
        """Fill `slot`; a second provider of one slot is a wiring error."""
        if slot in self._values:
            raise RuntimeError(f"{slot.name} is already provided")
        self._values[slot] = value

    def get(self, slot: Slot[T]) -> T:
        """The value in `slot`; a wiring error if no domain registered before fills it."""
        if slot not in self._values:
            raise RuntimeError(f"nothing provides the {slot.name}; register its provider first")
        return cast(T, self._values[slot])


class CacheFigures(Protocol):
    """A cache's hit and miss counts by layer, for the metrics endpoint."""

    def by_layer(self) -> tuple[Mapping[str, int], Mapping[str, int]]:
        """(hits by layer, misses by layer)."""
        ...


CACHE_FIGURES: Slot[CacheFigures] = Slot("cache figures")


class EffectiveValues(Protocol):
    """Subjects' effective preference values with provenance, served from memory where cached."""

    async def resolve(
        self, subjects: Sequence[Subject], key_prefixes: Sequence[str], categories: Sequence[str]
    ) -> list[list[ResolvedValue]]:
        """Per subject, in order: the effective value of every defined key selected by the filters."""
        ...

    async def resolve_shared(
        self, subjects: Sequence[Subject], key_prefixes: Sequence[str], categories: Sequence[str]
    ) -> list[tuple[Hashable, list[ResolvedValue]]]:
        """As resolve, each subject's values with a basis: subjects of one call with equal bases have
        equal values from the same stored rows (one list, resolved once), e.g. an org's users who
        override none of the selected keys."""
        ...


EFFECTIVE_VALUES: Slot[EffectiveValues] = Slot("effective values")


@dataclass(frozen=True, slots=True)
class KeyFacts:
    """What another domain may know of a defined preference key: its category, whether its values are
    sensitive (never shown or kept outside preferences), and its default."""

    key: str
    category: str
    sensitive: bool
    default: JsonValue


class KeyCatalog(Protocol):
    """The defined preference keys, from the definitions the preferences domain caches."""

    async def key_facts(self, key: str) -> KeyFacts | None:
        """The key's facts; None if no definition has this key."""
        ...

    async def category_keys(self, category: str) -> list[KeyFacts]:
        """The facts of every key of `category`, ordered by key (empty for an unknown category)."""
        ...


KEY_CATALOG: Slot[KeyCatalog] = Slot("key catalog")


@dataclass(frozen=True, slots=True)
class Kernel:
    """The shared parts of one server process, built once and handed to every domain's register()."""

    pool: asyncpg.Pool
    dsn: str
    installation: str
    feed: FeedReader
    redis: RedisLayers | None
    tokens: TokenKey
    pseudonym_key: str
    commits: LocalCommits
    privacy: PrivacyRegistry
    provisions: Provisions = field(default_factory=Provisions)
    caches: CacheBudget = field(default_factory=CacheBudget)
    # Connections for single read-only statements (cache loads): no reset round trip on release.
    read_pool: asyncpg.Pool | None = None


@dataclass(frozen=True, slots=True)
class Domain:
    """A registered domain: its gRPC servicers, and what runs alongside them.

    Each servicer carries `SERVICE_NAME` (its full gRPC name) and `add_to_server` (the generated
    registration function); `stop(grace_s)` runs after the gRPC server has drained.
    """

    name: str
    servicers: Sequence[Any]
    stop: Callable[[float], Awaitable[None]] | None = None
