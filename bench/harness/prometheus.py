"""prefd's Prometheus endpoint: a free port to start it on and the counters it exposes."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

from harness.children import HOST


def free_tcp_port() -> int:
    """A TCP port on HOST that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


async def scrape_counters(port: int, prefix: str) -> dict[str, float]:
    """Samples named `prefix`* from a Prometheus text endpoint on HOST:port (fetched off the event loop)."""

    def fetch() -> str:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
            text: str = response.read().decode()
            return text

    text = await asyncio.to_thread(fetch)
    found = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found
