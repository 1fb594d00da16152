"""Benchmark: prefd's GetEffectiveAIConfig against a bare grpc.aio baseline.

What it measures
    The cost prefd adds on top of grpc.aio for the AI configuration read,
    ``/prefd.v1.AIConfigService/GetEffectiveAIConfig`` for one subject (every field of the
    configuration resolved, with per-field provenance from the DEFAULT, ORG and USER layers),
    compared with bench/echo_server.py serving the same method path (``--method``) with a fixed,
    prebuilt copy of a real prefd GetEffectiveAIConfig response: no auth, no database, no
    protobuf work. Nothing is written while measuring, so after the first call prefd can answer
    every call from its caches: this is the cached read.

    The harness is harness.echo_comparison, as for bench/effective_read.py (this script only gives it
    its own ReadTarget): serial latency (N sequential grpc.aio calls, p50/p90/p99 in µs) and h2load
    throughput (-D seconds, -c clients, -m streams per client), with the same correctness checks:
    one real gRPC call to each server returns the expected configuration (the echo server the
    very bytes prefd sent); one fixed-count h2load run per server receives exactly one full
    response message per request; every timed run receives at least that many bytes. Echo and
    prefd alternate for --rounds rounds (at least 3); the report gives every round, the medians
    and the prefd/echo ratios of median req/s and of median p50 latency.

Setup
    As bench/effective_read.py: a fresh database ``prefd_bench_<random>`` on DATABASE_URL's server,
    else on an embedded PostgreSQL in a temporary directory (dropped at the end); prefd and the
    echo server as child processes pinned to the first CPU, the load generators to the others.
    Before measuring, an admin token creates two named configs for the subject
    (user bench-user, org bench-org):

    * ORG bench-org ``bench-org-limits``: model.temperature 0.5, rate_limiting.requests_per_minute
      100, rate_limiting.concurrent_requests 5;
    * USER bench-user ``bench-user-budget``: model.max_tokens 2000, cost_budget.daily_usd 20,
      cost_budget.alert_thresholds [0.8, 1.0].

    The reads use a service token (keys masked; the configs hold none) and name the subject's
    org explicitly. The checked response has those values from those layers (config id, name and
    version 1 in the provenance), the rest from the defaults, every field of the model,
    rate_limiting, retry, cost_budget and timeouts sections set, no violations and a cursor.

Output
    One JSON document on stdout (the same shape as bench/effective_read.py's); progress on stderr.

Run it (from the repository root; needs h2load, Debian package nghttp2-client):

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python bench/ai_effective_read.py --duration 10 --clients 50 --streams 10 --serial 500
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import grpc
from harness.auth import auth_metadata
from harness.children import HOST
from harness.echo_comparison import SUBJECT, ReadTarget, main

from prefd.v1 import ai_config_pb2, ai_config_pb2_grpc, common_pb2

METHOD = "/prefd.v1.AIConfigService/GetEffectiveAIConfig"
DEFAULT_MODEL = "claude-sonnet-4-5-20250929"  # seed 001's default model

ORG_CONFIG = ai_config_pb2.AIConfig(
    name="bench-org-limits",
    org_id=SUBJECT.org_id,
    active=True,
    configuration=ai_config_pb2.AIConfiguration(
        model=ai_config_pb2.ModelConfiguration(temperature=0.5),
        rate_limiting=ai_config_pb2.RateLimitConfiguration(requests_per_minute=100, concurrent_requests=5),
    ),
)
USER_CONFIG = ai_config_pb2.AIConfig(
    name="bench-user-budget",
    user_id=SUBJECT.user_id,
    active=True,
    configuration=ai_config_pb2.AIConfiguration(
        model=ai_config_pb2.ModelConfiguration(max_tokens=2000),
        cost_budget=ai_config_pb2.CostBudget(
            daily_usd=20.0, alert_thresholds=ai_config_pb2.AlertThresholds(values=[0.8, 1.0])
        ),
    ),
)

# The sections whose every field the effective configuration must carry (api_keys has none here).
SECTIONS = ("model", "rate_limiting", "retry", "cost_budget", "timeouts")

# The configs the seed created, by layer (their ids are only known then).
_created: dict[int, ai_config_pb2.AIConfig] = {}


async def seed_configs(port: int, admin_token: str) -> None:
    """Create the ORG and the USER config for the benchmark subject (admin token)."""
    async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
        stub = ai_config_pb2_grpc.AIConfigServiceStub(channel)
        for layer, config in ((common_pb2.LAYER_ORG, ORG_CONFIG), (common_pb2.LAYER_USER, USER_CONFIG)):
            request = ai_config_pb2.CreateAIConfigRequest(config=config, reason="benchmark setup")
            response = await stub.CreateAIConfig(request, metadata=auth_metadata(admin_token), timeout=30)
            _created[layer] = response.config


def layer_name(layer: int) -> str:
    return str(common_pb2.Layer.Name(layer))  # type: ignore[arg-type]


def check_ai_response(response: ai_config_pb2.GetEffectiveAIConfigResponse) -> dict[str, Any]:
    """Fail unless the response is the seeded chain resolved: values, provenance, no violations, a cursor."""
    problems: list[str] = []
    configuration = response.configuration
    for section in SECTIONS:
        message = getattr(configuration, section)
        unset = [f.name for f in message.DESCRIPTOR.fields if f.has_presence and not message.HasField(f.name)]
        if unset:
            problems.append(f"{section} lacks {', '.join(unset)}")
    if not configuration.cost_budget.alert_thresholds.values:
        problems.append("cost_budget.alert_thresholds is empty")

    expected: list[tuple[str, Any, Any, int]] = [
        ("model.temperature", configuration.model.temperature, 0.5, common_pb2.LAYER_ORG),
        (
            "rate_limiting.requests_per_minute",
            configuration.rate_limiting.requests_per_minute,
            100,
            common_pb2.LAYER_ORG,
        ),
        ("rate_limiting.concurrent_requests", configuration.rate_limiting.concurrent_requests, 5, common_pb2.LAYER_ORG),
        ("model.max_tokens", configuration.model.max_tokens, 2000, common_pb2.LAYER_USER),
        ("cost_budget.daily_usd", configuration.cost_budget.daily_usd, 20.0, common_pb2.LAYER_USER),
        (
            "cost_budget.alert_thresholds",
            list(configuration.cost_budget.alert_thresholds.values),
            [0.8, 1.0],
            common_pb2.LAYER_USER,
        ),
        ("model.model", configuration.model.model, DEFAULT_MODEL, common_pb2.LAYER_DEFAULT),
        ("model.top_p", configuration.model.top_p, 0.9, common_pb2.LAYER_DEFAULT),
    ]
    for path, got, want, layer in expected:
        if got != want:
            problems.append(f"{path} is {got!r}, expected {want!r}")
        provenance = response.provenance.get(path)
        if provenance is None:
            problems.append(f"no provenance for {path}")
            continue
        if provenance.layer != layer:
            problems.append(f"{path} comes from {layer_name(provenance.layer)}, expected {layer_name(layer)}")
        elif layer in _created:
            config = _created[layer]
            if (provenance.config_id, provenance.config_name, provenance.version) != (config.id, config.name, 1):
                problems.append(
                    f"{path} provenance names config {provenance.config_id!r} {provenance.config_name!r} "
                    f"v{provenance.version}, expected {config.id!r} {config.name!r} v1"
                )
    if response.violations:
        problems.append(f"violations: {[v.field for v in response.violations]}")
    if not response.HasField("cursor"):
        problems.append("no cursor")
    if problems:
        raise RuntimeError("prefd returned an unexpected GetEffectiveAIConfig response: " + "; ".join(problems))
    return {
        "provenance_entries": len(response.provenance),
        "provenance_layers": layer_counts(response),
        "model.temperature": "0.5 (LAYER_ORG)",
        "rate_limiting.requests_per_minute": "100 (LAYER_ORG)",
        "model.max_tokens": "2000 (LAYER_USER)",
        "cost_budget.daily_usd": "20 (LAYER_USER)",
        "model.model": f"{DEFAULT_MODEL} (LAYER_DEFAULT)",
        "violations": 0,
    }


def layer_counts(response: ai_config_pb2.GetEffectiveAIConfigResponse) -> dict[str, int]:
    """How many provenance entries each layer supplied."""
    return dict(sorted(Counter(layer_name(p.layer) for p in response.provenance.values()).items()))


AI_EFFECTIVE = ReadTarget(
    benchmark="GetEffectiveAIConfig: prefd vs a bare grpc.aio baseline",
    description="Benchmark prefd GetEffectiveAIConfig against a bare grpc.aio echo server.",
    method=METHOD,
    request=ai_config_pb2.GetEffectiveAIConfigRequest(subject=SUBJECT),
    response_type=ai_config_pb2.GetEffectiveAIConfigResponse,
    seed=seed_configs,
    check=check_ai_response,
    payload=lambda response: {
        "provenance_entries": len(response.provenance),
        "provenance_layers": layer_counts(response),
    },
    answered=lambda response: response.HasField("configuration") and len(response.provenance) > 0,
    empty_answer="no configuration or no provenance",
)


if __name__ == "__main__":
    raise SystemExit(main(AI_EFFECTIVE))
