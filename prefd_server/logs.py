"""Structured logs: one JSON object per line (or plain text), carrying the request id and method of
the RPC being handled. Log calls pass identifiers, codes and counts, never values: preference values,
API keys and tokens are not logged anywhere."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

from prefd_server.rpc.principal import current_request

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestContextFilter(logging.Filter):
    """Adds `request_id` and `rpc` to every record emitted while an RPC is handled (empty otherwise)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request = current_request()
        record.request_id, record.rpc = request if request is not None else ("", "")
        return True


def log_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing `json` (one object per line: time, level, logger, message, request_id, rpc,
    and exception text when there is one) or `text` records to `stream` (stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}{request_id}{rpc}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestContextFilter())
    return handler


def configure_logging(level: str, log_format: str) -> None:
    """Route every logger through one handler on stderr."""
    root = logging.getLogger()
    root.handlers[:] = [log_handler(log_format)]
    root.setLevel(level.upper())
    # pgserver narrates every command it runs at INFO; keep its warnings only.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
