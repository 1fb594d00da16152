"""Progress lines on stderr, stamped with the seconds since start (stdout is reserved for the JSON report)."""

from __future__ import annotations

import sys
import time

_T0 = time.monotonic()


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)
