"""The metrics endpoint parses with prometheus_client and reports feed lag, watch streams and cache use."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.app import App
from tests.helpers.auth import auth, unique
from tests.helpers.metrics import scrape
from tests.helpers.settings import make_settings

ADMIN = auth("admin")


async def test_metrics_report_watches_feed_and_cache(database_url, tmp_path) -> None:
    async with App(make_settings(database_url, tmp_path, metrics_port=0, metrics_host="127.0.0.1")) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
            before = await asyncio.to_thread(scrape, app.metrics_port)
            request = preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=unique("u")))
            await stub.GetEffectivePreferences(request, metadata=ADMIN)
            await stub.GetEffectivePreferences(request, metadata=ADMIN)
            watch = stub.WatchPreferences(
                preferences_pb2.WatchPreferencesRequest(subject=request.subject), metadata=ADMIN
            )
            await watch.read()
            after = await asyncio.to_thread(scrape, app.metrics_port)
            watch.cancel()
    assert after["prefd_watch_streams"] == before["prefd_watch_streams"] + 1
    assert after["prefd_cache_hits_total{layer=response}"] == before["prefd_cache_hits_total{layer=response}"] + 1
    assert after["prefd_cache_misses_total{layer=response}"] == before["prefd_cache_misses_total{layer=response}"] + 1
    assert after["prefd_feed_lag_seconds"] >= 0
    assert after["prefd_feed_seconds_since_read"] < 5


async def test_metrics_count_each_call_by_code_with_latency_and_pool_figures(database_url, tmp_path) -> None:
    async with App(make_settings(database_url, tmp_path, metrics_port=0, metrics_host="127.0.0.1")) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
            uid = unique("u")
            request = preferences_pb2.GetEffectivePreferencesRequest(subject=common_pb2.Subject(user_id=uid))
            labels = "method=GetEffectivePreferences,service=prefd.v1.PreferencesService"
            before = await asyncio.to_thread(scrape, app.metrics_port)
            for _ in range(3):
                await stub.GetEffectivePreferences(request, metadata=ADMIN)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetEffectivePreferences(request, metadata=auth("user", "someone-else"))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetEffectivePreferences(request)
            after = await asyncio.to_thread(scrape, app.metrics_port)

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert delta(f"prefd_rpc_calls_total{{code=OK,{labels}}}") == 3
    assert delta(f"prefd_rpc_calls_total{{code=PERMISSION_DENIED,{labels}}}") == 1
    assert delta(f"prefd_rpc_calls_total{{code=UNAUTHENTICATED,{labels}}}") == 1
    assert delta(f"prefd_rpc_duration_seconds_count{{{labels}}}") == 5
    assert delta(f"prefd_rpc_duration_seconds_bucket{{le=+Inf,{labels}}}") == 5
    assert after[f"prefd_rpc_duration_seconds_sum{{{labels}}}"] > before.get(
        f"prefd_rpc_duration_seconds_sum{{{labels}}}", 0
    )
    assert after["prefd_db_pool_connections{state=idle}"] + after["prefd_db_pool_connections{state=in_use}"] >= 1
    assert after["prefd_db_pool_waiting"] == 0 and after["prefd_db_pool_max"] >= 1


async def test_each_cache_reports_bytes_within_its_budget_entries_lookups_and_evictions(
    fresh_database, tmp_path
) -> None:
    # A database of its own (no rollouts by user id from other tests: every subject shares its org's body).
    # 512 KiB in all: the prebuilt responses get about 150 KiB, so 400 subjects' entries cannot all stay.
    database = await fresh_database()
    settings = make_settings(database, tmp_path, metrics_port=0, metrics_host="127.0.0.1", cache_bytes="512KiB")
    async with App(settings) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
            for n in range(400):
                subject = common_pb2.Subject(user_id=f"{unique('u')}-{n}", org_id="acme")
                request = preferences_pb2.GetEffectivePreferencesRequest(subject=subject)
                await stub.GetEffectivePreferences(request, metadata=ADMIN)
            await stub.GetEffectivePreferences(request, metadata=ADMIN)
            figures = await asyncio.to_thread(scrape, app.metrics_port)
    for cache in ("preferences.layers", "preferences.responses", "preferences.org_bases"):
        assert (
            0 < figures[f"prefd_cache_bytes{{cache={cache}}}"] <= figures[f"prefd_cache_budget_bytes{{cache={cache}}}"]
        )
        assert figures[f"prefd_cache_entries{{cache={cache}}}"] > 0
    assert figures["prefd_cache_evictions_total{cache=preferences.responses}"] > 0
    assert figures["prefd_cache_lookups_total{cache=preferences.responses,result=hit}"] >= 1
    assert figures["prefd_cache_lookups_total{cache=preferences.responses,result=miss}"] >= 400
    # Every subject of the org shared one base, and its body: a response costs its entry, not a body.
    assert figures["prefd_cache_entries{cache=preferences.org_bases}"] == 1
    responses = figures["prefd_cache_entries{cache=preferences.responses}"]
    assert figures["prefd_cache_bytes{cache=preferences.responses}"] / responses < 1024
    total = sum(v for k, v in figures.items() if k.startswith("prefd_cache_budget_bytes"))
    assert total <= 512 * 1024
