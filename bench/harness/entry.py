"""run_main: runs a benchmark's coroutine, cancels it on SIGTERM, and prints its JSON report on stdout."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from harness.progress import log


def run_main(benchmark: Callable[[Path], Awaitable[dict[str, Any]]], prefix: str) -> int:
    """Run `benchmark(work_dir)`, print its report (plus elapsed_s) as JSON on stdout; 130 when interrupted.

    SIGTERM and Ctrl-C cancel the benchmark's task, so every finally block (child processes,
    database) runs. Child logs in work_dir are removed on success and kept (and named) on failure.
    """
    started = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix=prefix))

    async def cancellable() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await benchmark(work_dir)

    try:
        report = asyncio.run(cancellable())
    except (KeyboardInterrupt, asyncio.CancelledError):
        shutil.rmtree(work_dir, ignore_errors=True)
        log("interrupted; servers stopped and the benchmark database removed")
        return 130
    except BaseException:
        log(f"failed; servers stopped, database removed, child logs kept in {work_dir}")
        raise
    shutil.rmtree(work_dir, ignore_errors=True)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0
