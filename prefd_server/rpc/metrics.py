"""Per-method RPC counts by status code and latency histograms (prometheus-client)."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

# From half a millisecond (a cached read) to ten seconds; streams are observed over their lifetime.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class MethodObserver:
    """One method's metric children, bound once at registration so a call pays two cheap updates."""

    __slots__ = ("_calls", "_counters", "_latency", "_method", "_service")

    def __init__(self, calls: Counter, latency: Histogram, service: str, method: str) -> None:
        self._calls = calls
        self._service = service
        self._method = method
        self._latency = latency.labels(service, method)
        self._counters: dict[grpc.StatusCode, Counter] = {}

    def observe(self, code: grpc.StatusCode, seconds: float) -> None:
        counter = self._counters.get(code)
        if counter is None:
            counter = self._counters[code] = self._calls.labels(self._service, self._method, code.name)
        counter.inc()
        self._latency.observe(seconds)


class RpcMetrics:
    """prefd_rpc_calls_total{service,method,code} and prefd_rpc_duration_seconds{service,method}."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._calls = Counter(
            "prefd_rpc_calls",
            "RPCs handled, by method and status code",
            ["service", "method", "code"],
            registry=registry,
        )
        self._latency = Histogram(
            "prefd_rpc_duration_seconds",
            "Time from a call's start to its status (a stream's whole lifetime), by method",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def method(self, full_method: str) -> MethodObserver:
        """The observer of `/package.Service/Method`."""
        _, service, method = full_method.split("/")
        return MethodObserver(self._calls, self._latency, service, method)
