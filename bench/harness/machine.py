"""What the numbers were measured on: CPUs, versions and the load average."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import grpc


def machine_info() -> dict[str, Any]:
    """CPU model and count, platform, Python, grpcio and h2load versions, load average at start."""
    try:
        h2load_version = subprocess.run(["h2load", "--version"], capture_output=True, text=True, check=False).stdout
    except OSError:
        h2load_version = "not installed"
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "grpcio": grpc.__version__,
        "h2load": h2load_version.strip(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def loadavg_1m() -> float:
    """The 1-minute load average now (noise context for a round)."""
    return round(os.getloadavg()[0], 2)
