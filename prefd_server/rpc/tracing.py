"""OpenTelemetry tracing of prefd's RPCs, off unless the standard OTEL_* variables ask for it: what turns it
on, read once at start-up, needing no OpenTelemetry package (prefd_server.rpc.tracing_otel does the work).

Tracing is on when
- OTEL_TRACES_EXPORTER names an exporter other than `none` (`otlp`, `console`, or any installed
  `opentelemetry_traces_exporter` entry point; a comma-separated list sends to each), or
- OTEL_TRACES_EXPORTER is unset and OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT is set
  (then spans go over OTLP);
and never when OTEL_SDK_DISABLED is `true` or OTEL_TRACES_EXPORTER is `none`. Everything else (endpoint,
headers, sampler, resource, batching) is the SDK's own OTEL_* settings. `otlp` is OTLP over gRPC unless
OTEL_EXPORTER_OTLP_TRACES_PROTOCOL / OTEL_EXPORTER_OTLP_PROTOCOL says `http/protobuf` (that exporter is
not in prefd's `tracing` extra: install opentelemetry-exporter-otlp-proto-http beside it).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol

import grpc

from prefd_server.settings import SettingsError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from prefd_server.rpc.tracing_otel import RpcTracing

EXTRA = "prefd-server[tracing]"
# Where OpenTelemetry's SDK finds span exporters by name (OTEL_TRACES_EXPORTER).
EXPORTER_GROUP = "opentelemetry_traces_exporter"
_OTLP_BY_PROTOCOL = {"": "otlp_proto_grpc", "grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


class CallObserver(Protocol):
    """What sees each call end (the metrics' MethodObserver; with tracing on, its wrapper that also
    writes the status code on the call's span)."""

    def observe(self, code: grpc.StatusCode, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """Tracing is on: the span exporters by entry-point name (each fed in batches, in the background), and
    an exporter handed in directly that receives each span as it ends (tests: the SDK's InMemorySpanExporter)."""

    exporters: tuple[str, ...] = ()
    exporter: SpanExporter | None = None


def tracing_settings(environ: Mapping[str, str]) -> TracingSettings | None:
    """Whether the OTEL_* variables of `environ` ask for tracing (None: off), and where spans go.

    SettingsError when they ask for it but the `tracing` extra is not installed, or name an exporter
    that is not installed."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = [name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    if named:
        asked_by = "OTEL_TRACES_EXPORTER"
        named = [name for name in named if name != "none"]
        if not named:
            return None
    else:
        endpoints = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
        asked_by = next((variable for variable in endpoints if environ.get(variable, "").strip()), "")
        if not asked_by:
            return None
        named = ["otlp"]
    try:
        importlib.import_module("prefd_server.rpc.tracing_otel")
    except ImportError as exc:
        missing = exc.name or "an OpenTelemetry package"
        raise SettingsError(
            f"{asked_by} asks for OpenTelemetry tracing, but {missing} is not installed: install {EXTRA}"
        ) from exc
    return TracingSettings(exporters=tuple(_exporter_name(name, environ) for name in named))


def _exporter_name(name: str, environ: Mapping[str, str]) -> str:
    """The entry-point name of exporter `name` (`otlp` by the OTLP protocol setting), checked installed."""
    if name == "otlp":
        variable = next(
            (v for v in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL") if environ.get(v)),
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        )
        protocol = environ.get(variable, "").strip().lower()
        if protocol not in _OTLP_BY_PROTOCOL:
            raise SettingsError(f"{variable}: {protocol!r} is not an OTLP protocol (grpc or http/protobuf)")
        name = _OTLP_BY_PROTOCOL[protocol]
    if not entry_points(group=EXPORTER_GROUP, name=name):
        package = {"otlp_proto_http": "opentelemetry-exporter-otlp-proto-http"}.get(name, "a package providing it")
        raise SettingsError(
            f"OTEL_TRACES_EXPORTER: no span exporter {name!r} is installed ({EXTRA} has otlp over gRPC and "
            f"console; install {package})"
        )
    return name


def start_tracing(settings: TracingSettings | None) -> RpcTracing | None:
    """Start tracing as `settings` say (None: off, and nothing of OpenTelemetry is loaded)."""
    if settings is None:
        return None
    from prefd_server.rpc.tracing_otel import RpcTracing

    return RpcTracing.start(settings)
