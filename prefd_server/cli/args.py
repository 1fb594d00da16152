"""Settings for a command: the environment, overridden by the command line's options."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import ValidationError

from prefd_server.settings import Settings


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with --port, --data-dir, --host and --workers applied."""
    overrides: dict[str, Any] = {}
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    if getattr(args, "data_dir", None) is not None:
        overrides["data_dir"] = args.data_dir
    if getattr(args, "host", None) is not None:
        overrides["host"] = args.host
    if getattr(args, "workers", None) is not None:
        overrides["workers"] = args.workers
    return Settings(**overrides)


def invalid_settings_message(error: ValidationError) -> str:
    """One line per invalid setting, named as in the environment; never the value (it may be a secret)."""
    lines = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        name = field if field.isupper() else f"PREFD_{field.upper()}"
        lines.append(f"prefd: {name}: {problem['msg']}")
    return "\n".join(lines)
