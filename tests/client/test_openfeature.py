"""prefd.client.openfeature through the OpenFeature SDK's public API against the real server: reasons,
variants and metadata from provenance, a subject's first evaluation (blocking and async), the error
codes, CONFIGURATION_CHANGED with the changed keys, the bound on views, and the provider's events when
the server refuses the token, cannot be reached, goes away and comes back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import EventDetails, ProviderEvent
from openfeature.exception import ErrorCode, GeneralError, ProviderFatalError
from openfeature.flag_evaluation import Reason
from openfeature.provider import ProviderStatus

from prefd.client import Backoff
from prefd.client.openfeature import PrefdProvider
from prefd.v1 import common_pb2, preferences_pb2
from prefd_server.app import App
from prefd_server.preferences.rollout import bucket
from tests.helpers.auth import auth, token, unique
from tests.helpers.processes import free_port
from tests.helpers.requests import GLOBAL, org, set_request, tv, user
from tests.helpers.settings import make_settings

ADMIN = auth("admin")
FAST = Backoff(initial_s=0.05, max_s=0.3)


@dataclass(frozen=True)
class Keys:
    """Definitions of one test's own, one per flag type, under one prefix."""

    prefix: str

    def __getattr__(self, name: str) -> str:
        return f"{self.prefix}{name}"


DEFINITIONS: dict[str, tuple[common_pb2.ValueType.ValueType, Any]] = {
    "enabled": (common_pb2.VALUE_TYPE_BOOL, False),
    "limit": (common_pb2.VALUE_TYPE_INT, 10),
    "ratio": (common_pb2.VALUE_TYPE_DOUBLE, 0.5),
    "theme": (common_pb2.VALUE_TYPE_STRING, "plain"),
    "checkout": (common_pb2.VALUE_TYPE_STRING, "old"),
    "layout": (common_pb2.VALUE_TYPE_JSON, {"columns": 2}),
    "channels": (common_pb2.VALUE_TYPE_STRING_LIST, ["email"]),
}


async def define_keys(stub) -> Keys:
    keys = Keys(f"tests.{unique('of')}.")
    for name, (value_type, default) in DEFINITIONS.items():
        definition = preferences_pb2.Definition(
            key=getattr(keys, name), category="tests", type=value_type, default_value=tv(default)
        )
        await stub.CreateDefinition(preferences_pb2.CreateDefinitionRequest(definition=definition), metadata=ADMIN)
    return keys


def subject(user_id: str, org_id: str = "") -> EvaluationContext:
    return EvaluationContext(targeting_key=user_id, attributes={"org": org_id} if org_id else {})


class Events:
    """Event details an OpenFeature handler receives (on the SDK's threads), awaited with a deadline."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[EventDetails] = asyncio.Queue()
        self.seen: list[EventDetails] = []

    def __call__(self, details: EventDetails) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, details)

    async def until(self, holds: Callable[[EventDetails], bool], deadline_s: float = 15) -> EventDetails:
        """The first event (from now on, or received before and not yet taken) for which `holds`."""
        async with asyncio.timeout(deadline_s):
            while True:
                details = await self._queue.get()
                self.seen.append(details)
                if holds(details):
                    return details


@contextlib.asynccontextmanager
async def registered(provider: PrefdProvider, *, wait: bool = True) -> AsyncIterator[OpenFeatureClient]:
    """`provider` set for a domain of its own (initialized in a thread: the test server runs on this
    loop), that domain's client, and every provider shut down at the end."""
    domain = unique("domain")
    try:
        if wait:
            await asyncio.to_thread(api.set_provider_and_wait, provider, domain)
        else:
            api.set_provider(provider, domain)
        yield api.get_client(domain)
    finally:
        await asyncio.to_thread(api.clear_providers)


def provider_for(app: App, keys: Keys, **options: Any) -> PrefdProvider:
    return PrefdProvider(f"127.0.0.1:{app.port}", token("admin"), key_prefixes=[keys.prefix], **options)


# --- evaluation -----------------------------------------------------------------------------------


async def test_reasons_variants_and_metadata_follow_provenance(app: App, stub) -> None:
    keys = await define_keys(stub)
    uid, oid = unique("u"), unique("o")
    await stub.SetPreferences(set_request(GLOBAL, {keys.theme: "dark"}), metadata=ADMIN)
    await stub.SetPreferences(set_request(org(oid), {keys.limit: 20}), metadata=ADMIN)
    await stub.SetPreferences(set_request(user(uid), {keys.ratio: 0.75}), metadata=ADMIN)
    split = common_pb2.Rollout(
        variants=[
            common_pb2.RolloutVariant(name="control", value=tv("old"), weight=50),
            common_pb2.RolloutVariant(name="treatment", value=tv("new"), weight=50),
        ],
        salt="checkout-test",
    )
    await stub.SetPreferences(
        preferences_pb2.SetPreferencesRequest(
            scope=org(oid), writes=[preferences_pb2.PreferenceWrite(key=keys.checkout, rollout=split)]
        ),
        metadata=ADMIN,
    )
    expected_variant = "control" if bucket("checkout-test", uid, 100) < 50 else "treatment"
    ready = Events()
    api.add_handler(ProviderEvent.PROVIDER_READY, ready)  # removed with the providers (clear_providers)
    async with registered(provider_for(app, keys)) as flags:
        await ready.until(lambda details: details.provider_name == "prefd")
        ctx = subject(uid, oid)
        # The async twin waits for the subject's view; every later evaluation is answered from it.
        enabled = await flags.get_boolean_details_async(keys.enabled, True, ctx)
        assert (enabled.value, enabled.reason, enabled.error_code) == (False, Reason.DEFAULT, None)
        assert enabled.variant is None
        assert enabled.flag_metadata["layer"] == "DEFAULT" and enabled.flag_metadata["scope"] == ""
        assert enabled.flag_metadata["version"] == 1 and enabled.flag_metadata["cursor"]

        theme = flags.get_string_details(keys.theme, "x", ctx)
        assert (theme.value, theme.reason) == ("dark", Reason.STATIC)
        assert theme.flag_metadata["layer"] == "GLOBAL" and theme.flag_metadata["scope"] == "GLOBAL"
        assert theme.flag_metadata["updated_by"] == "ops" and theme.flag_metadata["version"] == 1

        limit = flags.get_integer_details(keys.limit, 0, ctx)
        assert (limit.value, limit.reason) == (20, Reason.TARGETING_MATCH)
        assert limit.flag_metadata["layer"] == "ORG" and limit.flag_metadata["scope"] == f"ORG:{oid}"

        ratio = await flags.get_float_details_async(keys.ratio, 0.0, ctx)
        assert (ratio.value, ratio.reason) == (0.75, Reason.TARGETING_MATCH)
        assert ratio.flag_metadata["layer"] == "USER" and ratio.flag_metadata["scope"] == f"USER:{uid}"
        assert isinstance(ratio.flag_metadata["updated_at"], str)

        checkout = flags.get_string_details(keys.checkout, "x", ctx)
        assert checkout.reason == Reason.SPLIT and checkout.variant == expected_variant
        assert checkout.value == {"control": "old", "treatment": "new"}[expected_variant]
        assert checkout.flag_metadata["layer"] == "ORG"

        layout = flags.get_object_details(keys.layout, {}, ctx)
        assert (layout.value, layout.reason) == ({"columns": 2}, Reason.DEFAULT)
        assert isinstance(layout.value, dict)
        layout.value["columns"] = 99  # the caller's copy: the next answer is the view's value
        assert flags.get_object_value(keys.layout, {}, ctx) == {"columns": 2}
        channels = flags.get_object_details(keys.channels, [], ctx)
        assert (channels.value, channels.reason) == (["email"], Reason.DEFAULT)
        # Another subject in the same org: the org's value, not the user's.
        other = await flags.get_float_details_async(keys.ratio, 0.0, subject(unique("u"), oid))
        assert (other.value, other.reason) == (0.5, Reason.DEFAULT)


async def test_a_subjects_first_blocking_evaluation_answers_not_ready_until_its_view_is_open(app: App, stub) -> None:
    keys = await define_keys(stub)
    async with registered(provider := provider_for(app, keys)) as flags:
        uid = unique("u")
        first = flags.get_boolean_details(keys.enabled, True, subject(uid))
        assert (first.value, first.reason, first.error_code) == (True, Reason.ERROR, ErrorCode.PROVIDER_NOT_READY)
        await provider.warm_async(uid)  # joins the opening the first evaluation started
        opened = flags.get_boolean_details(keys.enabled, True, subject(uid))
        assert (opened.value, opened.reason, opened.error_code) == (False, Reason.DEFAULT, None)

        # Warmed ahead (blocking, from a thread): the first blocking evaluation is answered at once.
        warmed, oid = unique("u"), unique("o")
        await asyncio.to_thread(provider.warm, warmed, oid)
        assert flags.get_integer_details(keys.limit, 0, subject(warmed, oid)).value == 10
        assert provider.subjects == [(uid, ""), (warmed, oid)]


async def test_unknown_keys_wrong_types_and_bad_contexts_answer_the_default_with_their_error(app: App, stub) -> None:
    keys = await define_keys(stub)
    async with registered(provider_for(app, keys)) as flags:
        ctx = subject(unique("u"))
        assert (await flags.get_boolean_details_async(keys.enabled, True, ctx)).error_code is None

        def fails(details: Any, code: ErrorCode, value: Any) -> None:
            assert (details.value, details.reason, details.error_code) == (value, Reason.ERROR, code), details
            assert details.error_message

        fails(flags.get_boolean_details(keys.missing, True, ctx), ErrorCode.FLAG_NOT_FOUND, True)
        # A key the provider's views do not hold (outside key_prefixes) is not found either.
        fails(flags.get_string_details("display.theme", "x", ctx), ErrorCode.FLAG_NOT_FOUND, "x")
        fails(flags.get_boolean_details(keys.limit, True, ctx), ErrorCode.TYPE_MISMATCH, True)
        fails(flags.get_integer_details(keys.enabled, 7, ctx), ErrorCode.TYPE_MISMATCH, 7)
        fails(flags.get_integer_details(keys.ratio, 7, ctx), ErrorCode.TYPE_MISMATCH, 7)
        fails(flags.get_string_details(keys.limit, "x", ctx), ErrorCode.TYPE_MISMATCH, "x")
        fails(await flags.get_object_details_async(keys.theme, {}, ctx), ErrorCode.TYPE_MISMATCH, {})
        mismatch = flags.get_boolean_details(keys.theme, False, ctx)
        assert mismatch.error_message == f"{keys.theme!r} is a string, not a bool"
        # An int is widened for a float evaluation, as prefd widens an int written to a double.
        widened = flags.get_float_details(keys.limit, 0.0, ctx)
        assert (widened.value, widened.reason, widened.error_code) == (10.0, Reason.DEFAULT, None)

        fails(flags.get_boolean_details(keys.enabled, True), ErrorCode.TARGETING_KEY_MISSING, True)
        no_key = EvaluationContext(attributes={"org": "acme"})
        fails(await flags.get_boolean_details_async(keys.enabled, True, no_key), ErrorCode.TARGETING_KEY_MISSING, True)
        bad_org = EvaluationContext(targeting_key="alice", attributes={"org": 5})
        fails(flags.get_integer_details(keys.limit, 3, bad_org), ErrorCode.INVALID_CONTEXT, 3)
        # An id the server refuses: the subject's error, at once, for the async twin.
        bad_id = await flags.get_boolean_details_async(keys.enabled, True, subject("bad\nid"))
        fails(bad_id, ErrorCode.INVALID_CONTEXT, True)
        assert flags.get_provider_status() == ProviderStatus.READY


async def test_a_write_is_announced_with_the_changed_keys(app: App, stub) -> None:
    keys = await define_keys(stub)
    uid, oid = unique("u"), unique("o")
    async with registered(provider_for(app, keys)) as flags:
        changed = Events()
        flags.add_handler(ProviderEvent.PROVIDER_CONFIGURATION_CHANGED, changed)
        ctx = subject(uid, oid)
        assert await flags.get_boolean_value_async(keys.enabled, True, ctx) is False
        await stub.SetPreferences(set_request(user(uid), {keys.enabled: True, keys.limit: 30}), metadata=ADMIN)
        announced: set[str] = set()

        def covers_both(details: EventDetails) -> bool:
            announced.update(details.flags_changed or ())
            return announced >= {keys.enabled, keys.limit}

        await changed.until(covers_both)
        # The view's first snapshot is no change: every event named the written keys only.
        assert all(set(details.flags_changed or ()) <= {keys.enabled, keys.limit} for details in changed.seen)
        assert all(details.metadata == {"targeting_key": uid, "org": oid} for details in changed.seen)
        enabled = flags.get_boolean_details(keys.enabled, False, ctx)
        assert (enabled.value, enabled.reason, enabled.flag_metadata["layer"]) == (True, Reason.TARGETING_MATCH, "USER")
        assert flags.get_integer_value(keys.limit, 0, ctx) == 30

        # An org write reaches this subject too.
        await stub.SetPreferences(set_request(org(oid), {keys.theme: "contrast"}), metadata=ADMIN)
        org_change = await changed.until(lambda details: details.flags_changed == [keys.theme])
        assert org_change.metadata == {"targeting_key": uid, "org": oid}
        assert flags.get_string_value(keys.theme, "x", ctx) == "contrast"


async def test_views_are_bounded_and_the_least_recently_evaluated_closes_first(app: App, stub) -> None:
    keys = await define_keys(stub)
    a, b, c = unique("a"), unique("b"), unique("c")
    async with registered(provider := provider_for(app, keys, max_views=2)) as flags:
        for uid in (a, b, a):
            assert await flags.get_integer_value_async(keys.limit, 0, subject(uid)) == 10
        assert provider.subjects == [(b, ""), (a, "")]
        assert await flags.get_integer_value_async(keys.limit, 0, subject(c)) == 10
        assert provider.subjects == [(a, ""), (c, "")]  # b was the least recently evaluated
        assert flags.get_integer_value(keys.limit, 0, subject(a)) == 10  # still open: from memory
        assert provider.subjects == [(c, ""), (a, "")]
        # b's view was closed: its next evaluation opens a new one (and c, now the least recent, closes).
        reopened = flags.get_integer_details(keys.limit, 0, subject(b))
        assert reopened.error_code == ErrorCode.PROVIDER_NOT_READY
        assert provider.subjects == [(a, ""), (b, "")]
        await provider.warm_async(b)
        assert flags.get_integer_details(keys.limit, 0, subject(b)).reason == Reason.DEFAULT
    assert provider.subjects == []  # shut down: every view closed


async def test_shutdown_closes_the_views_and_initialize_starts_again(app: App, stub) -> None:
    keys = await define_keys(stub)
    provider = provider_for(app, keys)
    uid = unique("u")
    async with registered(provider) as flags:
        assert await flags.get_integer_value_async(keys.limit, 0, subject(uid)) == 10
        assert provider.subjects == [(uid, "")]
    assert provider.subjects == []
    stopped = provider.resolve_integer_details(keys.limit, 0, subject(uid))
    assert stopped.error_code == ErrorCode.PROVIDER_NOT_READY
    # The SDK's global context names a subject: initialize warms it.
    api.set_evaluation_context(subject(uid))
    try:
        async with registered(provider) as flags:
            assert provider.subjects == [(uid, "")]
            assert flags.get_integer_details(keys.limit, 0).reason == Reason.DEFAULT
    finally:
        api.set_evaluation_context(EvaluationContext())


# --- refusals and failures ------------------------------------------------------------------------


async def test_a_refused_token_is_fatal_at_once(app: App, stub) -> None:
    keys = await define_keys(stub)
    started = time.monotonic()
    errors = Events()
    api.add_handler(ProviderEvent.PROVIDER_ERROR, errors)
    provider = PrefdProvider(f"127.0.0.1:{app.port}", "not-a-token", key_prefixes=[keys.prefix])
    domain = unique("domain")
    try:
        with pytest.raises(ProviderFatalError) as err:
            await asyncio.to_thread(api.set_provider_and_wait, provider, domain)
        assert "UNAUTHENTICATED" in str(err.value.error_message)
        event = await errors.until(lambda details: details.error_code == ErrorCode.PROVIDER_FATAL)
        assert "UNAUTHENTICATED" in str(event.message)
        flags = api.get_client(domain)
        assert flags.get_provider_status() == ProviderStatus.FATAL
        refused = await flags.get_boolean_details_async(keys.enabled, True, subject(unique("u")))
        assert (refused.value, refused.error_code) == (True, ErrorCode.PROVIDER_FATAL)
    finally:
        await asyncio.to_thread(api.clear_providers)
    assert time.monotonic() - started < 10


async def test_an_unreachable_server_is_an_error_at_once_and_each_evaluation_says_why(stub) -> None:
    keys = await define_keys(stub)
    started = time.monotonic()
    provider = PrefdProvider(f"127.0.0.1:{free_port()}", token("admin"), timeout_s=2, key_prefixes=[keys.prefix])
    domain = unique("domain")
    try:
        with pytest.raises(GeneralError) as err:
            await asyncio.to_thread(api.set_provider_and_wait, provider, domain)
        assert "UNAVAILABLE" in str(err.value.error_message)  # refused at once, not left to the deadline
        flags = api.get_client(domain)
        assert flags.get_provider_status() == ProviderStatus.ERROR
        failed = await flags.get_boolean_details_async(keys.enabled, True, subject(unique("u")))
        assert (failed.value, failed.reason, failed.error_code) == (True, Reason.ERROR, ErrorCode.GENERAL)
        assert "UNAVAILABLE" in str(failed.error_message)
    finally:
        await asyncio.to_thread(api.clear_providers)
    assert time.monotonic() - started < 15


async def test_a_subject_the_token_may_not_read_answers_its_own_error(app: App, stub) -> None:
    keys = await define_keys(stub)
    provider = PrefdProvider(f"127.0.0.1:{app.port}", token("user", "mallory"), key_prefixes=[keys.prefix])
    async with registered(provider) as flags:
        forbidden = await flags.get_boolean_details_async(keys.enabled, True, subject("alice"))
        assert (forbidden.value, forbidden.reason, forbidden.error_code) == (True, Reason.ERROR, ErrorCode.GENERAL)
        assert "PERMISSION_DENIED" in str(forbidden.error_message)
        # The same error from memory until the retry interval has passed (no call per evaluation).
        again = flags.get_boolean_details(keys.enabled, True, subject("alice"))
        assert (again.error_code, again.error_message) == (ErrorCode.GENERAL, forbidden.error_message)
        # Its own subject is served, and the provider stays READY for it.
        own = await flags.get_boolean_details_async(keys.enabled, True, subject("mallory"))
        assert (own.value, own.reason, own.error_code) == (False, Reason.DEFAULT, None)
        assert flags.get_provider_status() == ProviderStatus.READY
        with pytest.raises(GeneralError):
            await provider.warm_async("alice")


async def test_a_server_that_goes_away_makes_views_stale_then_refused_then_ready_again(
    database_url: str, stub, tmp_path: Path
) -> None:
    keys = await define_keys(stub)
    port = free_port()

    async def serve(stack: contextlib.AsyncExitStack, secret: str | None = None) -> None:
        """A prefd server on `port` (over the test server's database) until `stack` closes."""
        overrides: dict[str, Any] = {"port": port, "grace_period_s": 0.1}
        if secret is not None:
            overrides["jwt_secret"] = secret
        await stack.enter_async_context(App(make_settings(database_url, tmp_path / unique("data"), **overrides)))

    provider = PrefdProvider(
        f"127.0.0.1:{port}",
        token("admin"),
        key_prefixes=[keys.prefix],
        timeout_s=3,
        grace_s=0.3,
        backoff=FAST,
        health_check_s=0.05,
    )
    ctx = subject(unique("u"))
    stale, errors, ready = Events(), Events(), Events()
    async with contextlib.AsyncExitStack() as servers:
        server = await servers.enter_async_context(contextlib.AsyncExitStack())
        await serve(server)
        async with registered(provider) as flags:
            flags.add_handler(ProviderEvent.PROVIDER_STALE, stale)
            flags.add_handler(ProviderEvent.PROVIDER_ERROR, errors)
            flags.add_handler(ProviderEvent.PROVIDER_READY, ready)
            await ready.until(lambda details: True)  # the current status, at once
            assert await flags.get_integer_value_async(keys.limit, 0, ctx) == 10

            await server.aclose()  # the server goes away: the view serves its last values, then is stale
            went_stale = await stale.until(lambda details: True)
            assert went_stale.metadata == {"stale_views": 1}
            assert flags.get_provider_status() == ProviderStatus.STALE
            served = flags.get_integer_details(keys.limit, 0, ctx)
            assert (served.value, served.reason, served.error_code) == (10, Reason.STALE, None)
            assert served.flag_metadata["layer"] == "DEFAULT"

            # Back with another signing secret: the view's token is refused.
            server = await servers.enter_async_context(contextlib.AsyncExitStack())
            await serve(server, secret="another-signing-secret-" + "y" * 32)
            refused = await errors.until(lambda details: "UNAUTHENTICATED" in str(details.message))
            assert refused.error_code == ErrorCode.GENERAL
            assert flags.get_provider_status() == ProviderStatus.ERROR
            assert flags.get_integer_value(keys.limit, 0, ctx) == 10

            # Back as it was: the view resumes and the provider is READY again.
            await server.aclose()
            server = await servers.enter_async_context(contextlib.AsyncExitStack())
            await serve(server)
            await ready.until(lambda details: True)
            assert flags.get_provider_status() == ProviderStatus.READY
            live = flags.get_integer_details(keys.limit, 0, ctx)
            assert (live.value, live.reason) == (10, Reason.DEFAULT)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("max_views", 0, "max_views must be an int of at least 1"),
        ("max_views", 2.5, "max_views must be an int of at least 1"),
        ("timeout_s", 0, "timeout_s must be a number of seconds above 0"),
        ("grace_s", -1.0, "grace_s must be a number of seconds above 0"),
        ("health_check_s", "1", "health_check_s must be a number of seconds above 0"),
        ("key_prefixes", "display.", "key_prefixes is a sequence of prefixes"),
    ],
)
def test_bad_options_are_refused_by_name(option: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrefdProvider("127.0.0.1:1", "token", **{option: value})
