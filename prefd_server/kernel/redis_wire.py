"""One pipelined Redis connection for commands on a hot path: each command is written as it comes and
the replies (parsed by hiredis) answer the callers in order, with none of a pooled client's per-command
work. A caller waits at most `timeout_s` for a connection and as long again for its reply; a reply that
does not come in time closes the connection (failing the other commands on it: a stalled Redis stalls
them all) and the next command opens a new one.

redis-py (the rest of prefd's Redis use) takes a pooled connection, a retry wrapper and a parser per
command, which costs a decision several times what the command costs; this covers only what the
throttle script needs: TCP or Unix socket, AUTH and SELECT, no TLS (RedisLayers uses redis-py for a
rediss:// URL).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Mapping
from typing import Any

import hiredis


class RedisWireError(ConnectionError):
    """The connection failed or a reply did not come in time."""


def pack(args: tuple[str | int | bytes, ...]) -> bytes:
    """A command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader()
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            answer = self._waiting.popleft()
            if not answer.done():  # its caller gave up waiting
                answer.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or RedisWireError("connection closed")
        while self._waiting:
            answer = self._waiting.popleft()
            if not answer.done():
                answer.set_exception(RedisWireError(f"redis connection lost: {self.lost}"))

    def send(self, command: bytes) -> asyncio.Future[Any]:
        assert self.transport is not None
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(answer)
        self.transport.write(command)
        return answer

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class RedisWire:
    """Commands over one pipelined connection (opened on first use; reopened after a failure)."""

    def __init__(self, connection_kwargs: Mapping[str, Any], timeout_s: float) -> None:
        self._host = connection_kwargs.get("host", "localhost")
        self._port = int(connection_kwargs.get("port", 6379))
        self._path = connection_kwargs.get("path")
        self._db = int(connection_kwargs.get("db", 0) or 0)
        self._username = connection_kwargs.get("username")
        self._password = connection_kwargs.get("password")
        self._timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._opening: asyncio.Future[_Protocol] | None = None

    async def call(self, *args: str | int | bytes) -> Any:
        """The reply to one command; a Redis error reply is returned as a hiredis.ReplyError (not raised).
        RedisWireError when the connection fails or the reply takes longer than the timeout."""
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            protocol = await self._open()
        try:
            async with asyncio.timeout(self._timeout_s):
                return await protocol.send(pack(args))
        except TimeoutError as exc:
            self._drop(protocol)
            raise RedisWireError(f"no redis reply within {self._timeout_s} s") from exc

    async def _open(self) -> _Protocol:
        """The new connection every caller waiting for one shares (one connect at a time; a caller that
        gives up waiting does not cancel it for the others)."""
        if self._opening is None:
            opening = self._opening = asyncio.ensure_future(self._connect())
            opening.add_done_callback(self._opened)
        return await asyncio.shield(self._opening)

    def _opened(self, opening: asyncio.Future[_Protocol]) -> None:
        if self._opening is opening:
            self._opening = None
        if not opening.cancelled() and opening.exception() is None:
            self._protocol = opening.result()

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        protocol: _Protocol | None = None
        refused = ""
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._path:
                    _, protocol = await loop.create_unix_connection(_Protocol, self._path)
                else:
                    _, protocol = await loop.create_connection(_Protocol, self._host, self._port)
                for command in self._setup():
                    reply = await protocol.send(pack(command))
                    if isinstance(reply, hiredis.ReplyError):
                        refused = f"redis refused {command[0]}: {reply}"
                        break
        except (OSError, TimeoutError) as exc:
            if protocol is not None:
                protocol.close()
            raise RedisWireError(f"cannot connect to redis: {exc}") from exc
        if refused:
            protocol.close()
            raise RedisWireError(refused)
        return protocol

    def _setup(self) -> list[tuple[str | int, ...]]:
        """AUTH and SELECT, as the URL asks."""
        setup: list[tuple[str | int, ...]] = []
        if self._password:
            setup.append(("AUTH", self._username, self._password) if self._username else ("AUTH", self._password))
        if self._db:
            setup.append(("SELECT", self._db))
        return setup

    def _drop(self, protocol: _Protocol) -> None:
        protocol.close()
        if self._protocol is protocol:
            self._protocol = None

    def close(self) -> None:
        if self._protocol is not None:
            self._drop(self._protocol)
