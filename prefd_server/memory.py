"""Process-wide allocator settings that keep memory a caller can make the server touch from staying
held after the call.

glibc raises its mmap threshold each time a large block is freed, so after a few multi-megabyte
requests every later one is carved from the heap arenas of gRPC's threads and is rarely handed
back. Fixing the threshold keeps large buffers in their own mappings, returned on free."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ARENA_MAX = 2
MMAP_THRESHOLD_BYTES = 128 * 1024
TRIM_THRESHOLD_BYTES = 1024 * 1024


def return_large_buffers() -> bool:
    """Fix glibc's mmap and trim thresholds; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = all(
        mallopt(parameter, value)
        for parameter, value in (
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (_M_ARENA_MAX, ARENA_MAX),
        )
    )
    if not ok:
        log.info("allocator thresholds not set (mallopt refused)")
    return ok
