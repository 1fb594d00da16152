"""GetDatabaseHealth's report as protobuf."""

from __future__ import annotations

from typing import Any

from prefd.v1 import health_pb2


def database_health_to_pb(report: Any) -> health_pb2.GetDatabaseHealthResponse:
    raise NotImplementedError
