"""A stand-in for a gRPC server that keeps the method handlers a service is given, by method name."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from google.protobuf import descriptor_pool


class HandlerRegistry:
    """Keeps, by method name, the handlers served through the generic handlers it is given (prefd registers
    no methods; see prefd_server.rpc.middleware.add_generic)."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        for generic in handlers:
            service = descriptor_pool.Default().FindServiceByName(generic.service_name())
            for method in service.methods:
                details = SimpleNamespace(method=f"/{service.full_name}/{method.name}", invocation_metadata=())
                found = generic.service(details)
                if found is not None:
                    self.handlers[method.name] = found
