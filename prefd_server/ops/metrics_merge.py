"""One Prometheus endpoint for `prefd serve --workers N`: the parent process scrapes every worker and merges.

Each worker serves its own series on 127.0.0.1, on a port the kernel picks, and announces that port to
the parent through a pipe (WorkerPorts). The parent alone listens on PREFD_METRICS_HOST:PREFD_METRICS_PORT.
At each scrape it fetches every worker's exposition at once (WORKER_SCRAPE_TIMEOUT_S at most), parses
it with prometheus_client's own parser and yields one family per name, rendered by prometheus_client
(the Prometheus text format, or OpenMetrics when the scraper asks for it):

- Counters, histograms and summaries are summed across workers, sample by sample: `_total`, every
  `_bucket{le}`, `_sum` and `_count` (prometheus_client's Summary has no quantiles). Their `_created`
  sample is the earliest worker's. A worker that does not answer a scrape still counts, with the
  figures of its last answer, so each sum only grows and rate() never sees a false reset; what a dead
  worker did since the scrape before its death is lost, as it would be with one process.
- Gauges that add up across processes (SUMMED_GAUGES) are summed over the workers that answered:
  open watch streams, database pool connections, callers waiting and the pool bound (the server's
  ceiling on PostgreSQL connections is the workers' sum), and each in-process cache's bytes, budget
  and entries (each worker holds its own caches within its own PREFD_CACHE_BYTES).
- Every other gauge (prefd_feed_lag_seconds, prefd_feed_seconds_since_read,
  prefd_feed_horizon_held_seconds, and any gauge added later
  until it is listed) is a fact about one process: one series per answering worker, with a `worker`
  label (0 to N-1), so `max(prefd_feed_lag_seconds)` alerts on the worst one and the label
  names it.
- prefd_metrics_worker_up{worker} is 1 when a worker answered this scrape, 0 otherwise (also while it
  starts); prefd_metrics_worker_scrape_errors_total{worker} counts its failed scrapes (refused, timed
  out, an unparsable answer). A worker that fails never fails the scrape.

With one worker there is none of this: the process serves its own endpoint (metrics_endpoint.py).
"""

from __future__ import annotations

import http.client
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

# Well within Prometheus' default scrape timeout (10 s): a worker that answers later is left out.
WORKER_SCRAPE_TIMEOUT_S = 2.0
# The host a worker's own endpoint listens on: only the parent on this machine reads it.
WORKER_METRICS_HOST = "127.0.0.1"
# Gauge families summed across workers; every other gauge keeps one series per worker.
SUMMED_GAUGES = frozenset(
    {
        "prefd_watch_streams",
        "prefd_db_pool_connections",
        "prefd_db_pool_waiting",
        "prefd_db_pool_max",
        "prefd_cache_bytes",
        "prefd_cache_budget_bytes",
        "prefd_cache_entries",
    }
)
# Families whose samples are summed whole (prometheus_client's text-format type names).
SUMMED_TYPES = frozenset({"counter", "histogram", "summary"})
CREATED = "_created"
Labels = tuple[tuple[str, str], ...]


class WorkerPorts:
    """The port each worker's endpoint listens on, as the workers announce them through one pipe."""

    def __init__(self, read_fd: int) -> None:
        os.set_blocking(read_fd, False)
        self._fd = read_fd
        self._pending = b""
        self._ports: dict[int, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def announce(write_fd: int, worker: int, port: int) -> None:
        """Called in a worker once its endpoint listens (one write under PIPE_BUF: never interleaved)."""
        os.write(write_fd, f"{worker} {port}\n".encode())

    def current(self) -> dict[int, int]:
        """Worker index to port, reading whatever has been announced since the last call."""
        with self._lock:
            while True:
                try:
                    chunk = os.read(self._fd, 4096)
                except BlockingIOError:
                    break
                if not chunk:  # every worker has closed its end
                    break
                self._pending += chunk
            *lines, self._pending = self._pending.split(b"\n")
            for line in lines:
                worker, port = line.split()
                self._ports[int(worker)] = int(port)
            return dict(self._ports)

    def close(self) -> None:
        os.close(self._fd)


def fetch_exposition(port: int, timeout_s: float) -> str:
    """A worker's /metrics in the Prometheus text format (http.client: no proxy from the environment)."""
    connection = http.client.HTTPConnection(WORKER_METRICS_HOST, port, timeout=timeout_s)
    try:
        connection.request("GET", "/metrics")
        reply = connection.getresponse()
        body = reply.read()
        if reply.status != 200:
            raise OSError(f"worker metrics answered HTTP {reply.status}")
        return body.decode()
    finally:
        connection.close()


def parse_exposition(text: str) -> list[Metric]:
    """The families of one worker's exposition, each counter's and histogram's `_created` gauge folded
    back into its family (the text format sets it apart as a gauge of its own)."""
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name in [name for name in families if name.endswith(CREATED)]:
        base = families.get(name[: -len(CREATED)])
        if base is not None and base.type in SUMMED_TYPES and families[name].type == "gauge":
            base.samples.extend(families.pop(name).samples)
    return list(families.values())


class _Merged:
    """One merged family: samples grouped by label set (OpenMetrics keeps a series' points together)."""

    def __init__(self, family: Metric) -> None:
        self.family = family
        self.series: dict[Labels, dict[tuple[str, str | None], float]] = {}

    def add(self, name: str, labels: Mapping[str, str], value: float) -> None:
        le = labels.get("le")
        key: Labels = tuple((k, v) for k, v in labels.items() if k != "le")
        points = self.series.setdefault(key, {})
        seen = points.get((name, le))
        if seen is None:
            points[(name, le)] = value
        elif name.endswith(CREATED):
            points[(name, le)] = min(seen, value)
        else:
            points[(name, le)] = seen + value

    def metric(self) -> Metric:
        merged = Metric(self.family.name, self.family.documentation, self.family.type)
        for key, points in self.series.items():
            for (name, le), value in points.items():
                labels = dict(key) if le is None else {**dict(key), "le": le}
                merged.samples.append(Sample(name, labels, value))
        return merged


def merge_expositions(expositions: Mapping[int, Iterable[Metric]]) -> list[Metric]:
    """Every worker's families as one exposition: summed, or one series per worker (the module's rules)."""
    merged: dict[str, _Merged] = {}
    for worker, families in sorted(expositions.items()):
        for family in families:
            per_worker = family.type not in SUMMED_TYPES and family.name not in SUMMED_GAUGES
            target = merged.setdefault(family.name, _Merged(family))
            for sample in family.samples:
                labels = {**sample.labels, "worker": str(worker)} if per_worker else sample.labels
                target.add(sample.name, labels, sample.value)
    return [family.metric() for family in merged.values()]


class WorkersCollector(Collector):
    """Collects every worker's series at scrape time and merges them (see the module docstring)."""

    def __init__(
        self,
        workers: int,
        ports: Callable[[], Mapping[int, int]],
        timeout_s: float = WORKER_SCRAPE_TIMEOUT_S,
        fetch: Callable[[int, float], str] = fetch_exposition,
    ) -> None:
        self._workers = workers
        self._ports = ports
        self._timeout_s = timeout_s
        self._fetch = fetch
        self._lock = threading.Lock()
        self._errors = dict.fromkeys(range(workers), 0)
        # Each worker's summed families as of its last answer, counted while it does not answer.
        self._last_counted: dict[int, list[Metric]] = {}

    def collect(self) -> Iterator[Any]:
        answers = self._scrape_all(self._ports())
        expositions: dict[int, list[Metric]] = {}
        up = GaugeMetricFamily(
            "prefd_metrics_worker_up", "1 when the worker answered this scrape, else 0", labels=["worker"]
        )
        with self._lock:
            for worker in range(self._workers):
                answer = answers.get(worker)
                if isinstance(answer, list):
                    expositions[worker] = answer
                    self._last_counted[worker] = [f for f in answer if f.type in SUMMED_TYPES]
                else:
                    expositions[worker] = self._last_counted.get(worker, [])
                    if answer is not None:
                        self._errors[worker] += 1
                up.add_metric([str(worker)], 1 if isinstance(answer, list) else 0)
            errors = CounterMetricFamily(
                "prefd_metrics_worker_scrape_errors",
                "Scrapes of a worker's own endpoint that failed (refused, timed out, unparsable)",
                labels=["worker"],
            )
            for worker, count in self._errors.items():
                errors.add_metric([str(worker)], count)
        yield from merge_expositions(expositions)
        yield up
        yield errors

    def _scrape_all(self, ports: Mapping[int, int]) -> dict[int, list[Metric] | Exception]:
        """Every announced worker's parsed families, or why not; fetched at once, all within the timeout."""
        results: queue.SimpleQueue[tuple[int, list[Metric] | Exception]] = queue.SimpleQueue()

        def scrape(worker: int, port: int) -> None:
            try:
                results.put((worker, parse_exposition(self._fetch(port, self._timeout_s))))
            except Exception as exc:  # any failure of one worker is that worker's scrape error
                results.put((worker, exc))

        for worker, port in ports.items():
            # Daemon threads: one stuck on a worker that stopped answering never holds up the exit.
            threading.Thread(target=scrape, args=(worker, port), daemon=True, name=f"metrics-{worker}").start()
        answers: dict[int, list[Metric] | Exception] = {}
        deadline = time.monotonic() + self._timeout_s
        while len(answers) < len(ports):
            try:
                worker, answer = results.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            answers[worker] = answer
        for worker in ports.keys() - answers.keys():
            answers[worker] = TimeoutError(f"worker {worker} did not answer within {self._timeout_s} s")
        return answers


def start_workers_endpoint(port: int, host: str, workers: int, announcements_fd: int) -> tuple[Any, WorkerPorts]:
    """Serve every worker's merged series on host:port; returns the HTTP server (call shutdown()) and the
    announced ports (call close())."""
    ports = WorkerPorts(announcements_fd)
    registry = CollectorRegistry()
    registry.register(WorkersCollector(workers, ports.current))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, ports
