"""Hosts for tests: network namespaces joined to the root namespace by veth links, TCP relays that carry
their PostgreSQL and Redis traffic over those links, and prefd started inside a namespace.

Each host gets three links of its own (a /30 each in 10.213.N.0/24, N free on this machine): `front`
carries the test's gRPC calls to the host's prefd, `database` and `redis` carry prefd's connections to
relays in the root namespace, which forward to the real servers on loopback. A link is cut by a
`blackhole` queueing discipline on both of its ends: the link stays up and routed and every packet is
silently dropped, so open TCP connections hang and new ones wait for a SYN-ACK that never comes, as on
a real network partition (no reset, no "unreachable"); healing removes it and TCP retransmits. Nothing
leaves the namespaces and veths made here, loopback aside, and everything is removed on exit (a sweep
also removes what a killed earlier run left behind).

StallingRelay plays such a partition in-process for tests without namespaces (or root): the connections
it cut never forward again, as TCP connections whose retransmissions backed off far past the heal.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlparse

from tests.helpers.processes import TcpRelay, prefd_process

NAMESPACE_PREFIX = "prefd-hosts-"
SUBNET_PREFIX = "10.213."
LOCK_FILE = Path("/tmp/prefd-test-netns.lock")
_PR_SET_PDEATHSIG = 1


def run(*args: str) -> str:
    """Run a command (ip, tc) and return its output; fails the test with its stderr."""
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> None:
    """Remove the namespaces and root-side veths of earlier runs whose process is gone."""
    for line in run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        match = re.fullmatch(rf"{NAMESPACE_PREFIX}(\d+)-\w+", name)
        if match and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(RuntimeError):
                run("ip", "netns", "del", name)
    for line in run("ip", "-o", "link", "show").splitlines():
        match = re.match(r"\d+: (ph(\d+)[a-z]{2}r)[@:]", line)
        if match and not _pid_alive(int(match.group(2))):
            with contextlib.suppress(RuntimeError):
                run("ip", "link", "del", match.group(1))


@dataclass
class Link:
    """One veth pair: `root_ip` on the root namespace's end, `ns_ip` on the namespace's end."""

    netns: str
    root_dev: str
    ns_dev: str
    root_ip: str
    ns_ip: str
    cut_now: bool = False

    def create(self) -> None:
        run("ip", "link", "add", self.root_dev, "type", "veth", "peer", "name", self.ns_dev)
        run("ip", "link", "set", self.ns_dev, "netns", self.netns)
        run("ip", "addr", "add", f"{self.root_ip}/30", "dev", self.root_dev)
        run("ip", "link", "set", self.root_dev, "up")
        run("ip", "-n", self.netns, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_dev)
        run("ip", "-n", self.netns, "link", "set", self.ns_dev, "up")

    def cut(self) -> None:
        """Drop every packet both ways from now on (the link stays up)."""
        run("tc", "qdisc", "add", "dev", self.root_dev, "root", "blackhole")
        run("tc", "-n", self.netns, "qdisc", "add", "dev", self.ns_dev, "root", "blackhole")
        self.cut_now = True

    def heal(self) -> None:
        """Undo cut()."""
        run("tc", "qdisc", "del", "dev", self.root_dev, "root")
        run("tc", "-n", self.netns, "qdisc", "del", "dev", self.ns_dev, "root")
        self.cut_now = False


class StallingRelay(TcpRelay):
    """A TcpRelay on 127.0.0.1 that plays a network partition in-process: while cut, a connection that
    carries anything (either way) drops it and stalls for good, as a connection whose TCP retransmissions
    backed off far past the heal; connections idle through the cut flow again after heal(), and new
    ones wait for it. url() is the PostgreSQL URL of `database` through it."""

    def __init__(self, target: tuple[str, str, int], credentials: str = "postgres@") -> None:
        super().__init__("127.0.0.1", target)
        self._credentials = credentials
        self._open = asyncio.Event()
        self._open.set()
        self._stopping = asyncio.Event()
        self.stalled = 0  # connections stalled so far
        self._stalls = asyncio.Condition()

    def url(self, database: str) -> str:
        return f"postgresql://{self._credentials}127.0.0.1:{self.port}/{database}"

    def cut(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    async def stop(self) -> None:
        self._stopping.set()  # ends the stalled pipes
        await super().stop()

    async def until_stalled(self, count: int, deadline_s: float) -> None:
        """Wait until `count` connections have stalled (something was sent on them while cut)."""
        async with asyncio.timeout(deadline_s), self._stalls:
            await self._stalls.wait_for(lambda: self.stalled >= count)

    async def _admit(self) -> None:
        await self._open.wait()

    def _hold(self) -> Callable[[], Awaitable[bool]]:
        stalled = False

        async def hold() -> bool:
            nonlocal stalled
            if not stalled and not self._open.is_set():
                stalled = True
                async with self._stalls:
                    self.stalled += 1
                    self._stalls.notify_all()
            if stalled:
                await self._stopping.wait()  # for good
                return False
            return True

        return hold


@contextlib.asynccontextmanager
async def stalling_relay(server_url: str) -> AsyncIterator[StallingRelay]:
    """A StallingRelay to the PostgreSQL server of `server_url`, stopped on exit."""
    target, credentials = postgres_target(server_url)
    relay = StallingRelay(target, credentials)
    await relay.start()
    try:
        yield relay
    finally:
        relay.heal()
        await relay.stop()


def postgres_target(server_url: str) -> tuple[tuple[str, str, int], str]:
    """Where a relay reaches the PostgreSQL server of `server_url`, and the URL's user[:password]@."""
    parsed = urlparse(server_url)
    socket_dir = parse_qs(parsed.query).get("host", [None])[0]
    port = parsed.port or 5432
    target = ("unix", f"{socket_dir}/.s.PGSQL.{port}", 0) if socket_dir else ("tcp", parsed.hostname or "", port)
    user = quote(unquote(parsed.username or "postgres"), safe="")
    password = f":{quote(unquote(parsed.password), safe='')}" if parsed.password else ""
    return target, f"{user}{password}@"


def redis_target(redis_url: str) -> tuple[tuple[str, str, int], str, str]:
    """Where a relay reaches the Redis of `redis_url`, its credentials@ (or ""), and its /db path."""
    parsed = urlparse(redis_url)
    auth = redis_url.split("//", 1)[1].split("@", 1)[0] + "@" if "@" in parsed.netloc else ""
    return ("tcp", parsed.hostname or "127.0.0.1", parsed.port or 6379), auth, parsed.path or "/0"


@dataclass
class Host:
    """One namespace with its links and the relays that carry its PostgreSQL and Redis connections."""

    name: str
    netns: str
    front: Link
    database: Link
    redis: Link
    relays: dict[str, TcpRelay] = field(default_factory=dict)

    def database_url(self, server_url: str, database: str) -> str:
        """`database` on the server of `server_url`, reached through this host's database link."""
        _target, credentials = postgres_target(server_url)
        return f"postgresql://{credentials}{self.database.root_ip}:{self.relays['database'].port}/{database}"

    def redis_url(self, redis_url: str) -> str:
        """The Redis of `redis_url`, reached through this host's redis link."""
        _target, credentials, path = redis_target(redis_url)
        return f"redis://{credentials}{self.redis.root_ip}:{self.relays['redis'].port}{path}"

    @contextlib.contextmanager
    def healed_on_exit(self) -> Iterator[None]:
        """Heal, on the way out of the block, every link of this host the block left cut."""
        try:
            yield
        finally:
            for link in (self.front, self.database, self.redis):
                if link.cut_now:
                    link.heal()


def _free_subnet() -> int:
    """A third octet N with no 10.213.N.x address in the root namespace (callers hold the lock)."""
    used = set(re.findall(r"inet 10\.213\.(\d+)\.", run("ip", "-4", "-o", "addr", "show")))
    start = os.getpid() % 250
    for offset in range(250):
        candidate = (start + offset) % 250
        if str(candidate) not in used:
            return candidate
    raise RuntimeError("no free 10.213.N.0/24 for test links")


def _device(pid: int, host: str, kind: str, end: str) -> str:
    """A veth end's name (at most 15 characters): ph<pid><host letter><f|d|r><r|n>."""
    return f"ph{pid}{host}{kind}{end}"


def create_hosts(names: Sequence[str]) -> dict[str, Host]:
    """A namespace per one-letter name, with its front, database and redis links to the root namespace."""
    assert all(re.fullmatch("[a-z]", name) for name in names), names
    pid = os.getpid()
    hosts: dict[str, Host] = {}
    with LOCK_FILE.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs must not pick the same subnet
        octet = _free_subnet()
        base = 0
        for name in names:
            netns = f"{NAMESPACE_PREFIX}{pid}-{name}"
            run("ip", "netns", "add", netns)
            links = []
            for kind in "fdr":  # front, database, redis
                link = Link(
                    netns,
                    _device(pid, name, kind, "r"),
                    _device(pid, name, kind, "n"),
                    f"{SUBNET_PREFIX}{octet}.{base + 1}",
                    f"{SUBNET_PREFIX}{octet}.{base + 2}",
                )
                link.create()
                links.append(link)
                base += 4
            run("ip", "-n", netns, "link", "set", "lo", "up")
            hosts[name] = Host(name, netns, *links)
    return hosts


def remove_hosts(names: Sequence[str]) -> None:
    """Delete what create_hosts(names) made (or the part of it that exists)."""
    pid = os.getpid()
    for name in names:
        with contextlib.suppress(RuntimeError):
            run("ip", "netns", "del", f"{NAMESPACE_PREFIX}{pid}-{name}")
        for kind in "fdr":
            # Usually gone with the namespace already (deleting one end of a veth deletes both).
            with contextlib.suppress(RuntimeError):
                run("ip", "link", "del", _device(pid, name, kind, "r"))


@contextlib.asynccontextmanager
async def host_network(
    names: Sequence[str], postgres: tuple[str, str, int], redis: tuple[str, str, int]
) -> AsyncIterator[dict[str, Host]]:
    """One namespace per one-letter name with front, database and redis links, and relays to `postgres` and
    `redis` (targets as TcpRelay takes them) on the root end of each host's links. Everything goes on exit."""
    relays: list[TcpRelay] = []
    sweep_stale()
    try:
        hosts = create_hosts(names)
        for host in hosts.values():
            for key, link, target in (("database", host.database, postgres), ("redis", host.redis, redis)):
                relay = TcpRelay(link.root_ip, target)
                relays.append(relay)
                await relay.start()
                host.relays[key] = relay
        yield hosts
    finally:
        for relay in relays:
            await relay.stop()
        remove_hosts(names)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies, so no server outlives a killed run."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@contextlib.asynccontextmanager
async def prefd_in_namespace(
    netns: str, env: dict[str, str], startup_s: float = 60
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, list[str]]]:
    """`prefd serve` inside `netns` (ip netns exec); yields (process, port, every output line so far)."""
    async with prefd_process(
        env, startup_s=startup_s, command_prefix=("ip", "netns", "exec", netns), preexec_fn=_die_with_parent
    ) as started:
        yield started
