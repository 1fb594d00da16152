"""The pipelined Redis connection (RESP, pipelining, AUTH/SELECT, timeouts) and the batched throttle charges."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis.asyncio as aioredis

from prefd_server.kernel.redis import MAX_CHARGES_PER_ROUND_TRIP, ChargeOutcome, RedisLayers
from prefd_server.kernel.redis_wire import RedisWire, RedisWireError, pack
from tests.helpers.processes import free_port

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
HOUR = 3600


def redis_kwargs(db: int | None = None) -> dict[str, Any]:
    """Connection settings of REDIS_URL (for database `db` when given)."""
    kwargs = dict(aioredis.Redis.from_url(REDIS_URL).connection_pool.connection_kwargs)
    if db is not None:
        kwargs["db"] = db
    return kwargs


def reader_on(db: int) -> aioredis.Redis:
    """redis-py on REDIS_URL's server, database `db`."""
    kwargs = redis_kwargs()
    fields = ("host", "port", "username", "password")
    return aioredis.Redis(db=db, **{name: kwargs[name] for name in fields if name in kwargs})


@pytest.fixture
async def reader() -> AsyncIterator[aioredis.Redis]:
    """redis-py on REDIS_URL: an independent view of what the code under test wrote."""
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def wire() -> AsyncIterator[RedisWire]:
    connection = RedisWire(redis_kwargs(), 5.0)
    yield connection
    connection.close()


@pytest.fixture
def namespace() -> str:
    return f"wiretest-{secrets.token_hex(6)}"


@pytest.fixture
async def layers(namespace: str, reader: aioredis.Redis) -> AsyncIterator[RedisLayers]:
    """RedisLayers in a namespace of its own; its keys are deleted afterwards."""
    redis_layers = RedisLayers(REDIS_URL, namespace)
    yield redis_layers
    await redis_layers.close()
    keys = [key async for key in reader.scan_iter(match=f"prefd:{namespace}:*", count=1000)]
    if keys:
        await reader.delete(*keys)


def count_round_trips(layers: RedisLayers, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of keys of each charge script call `layers` makes from now on."""
    calls: list[int] = []
    original = layers._run_charge_script

    async def counted(keys: list[str], args: list[int | str]) -> list[Any]:
        calls.append(len(keys))
        return await original(keys, args)

    monkeypatch.setattr(layers, "_run_charge_script", counted)
    return calls


def this_hour() -> int:
    return int(time.time()) // HOUR * HOUR


class FakeRedis:
    """A local server speaking just enough RESP: each connection, in the order they come, either stays
    silent, drops the connection at its first command, or answers (PONG to PING, OK to anything else)."""

    def __init__(self, behaviours: list[str]) -> None:
        self.behaviours = behaviours
        self.connections = 0
        self.commands: list[list[bytes]] = []
        self.a_connection_closed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        behaviour = self.behaviours[min(self.connections, len(self.behaviours)) - 1]
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                if behaviour == "silent":
                    continue
                if behaviour == "drop":
                    break
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    self.commands.append(command)
                    writer.write(b"+PONG\r\n" if command[0].upper() == b"PING" else b"+OK\r\n")
        finally:
            self.a_connection_closed.set()
            writer.close()


def test_pack_encodes_a_command_as_an_array_of_bulk_strings() -> None:
    assert pack(("SET", b"k\x00\r\n", 42)) == b"*3\r\n$3\r\nSET\r\n$4\r\nk\x00\r\n\r\n$2\r\n42\r\n"
    assert pack(("ECHO", "", "é", -7)) == b"*4\r\n$4\r\nECHO\r\n$0\r\n\r\n$2\r\n\xc3\xa9\r\n$2\r\n-7\r\n"
    assert pack(("PING",)) == b"*1\r\n$4\r\nPING\r\n"


async def test_set_then_get_round_trips_binary_values(wire: RedisWire, reader: aioredis.Redis) -> None:
    key = f"wiretest:{secrets.token_hex(8)}"
    value = b"\x00\xff\r\nbinary"
    try:
        assert await wire.call("SET", key, value) == b"OK"
        assert await wire.call("GET", key) == value
        assert await reader.get(key) == value
        assert await wire.call("GET", f"{key}:missing") is None
    finally:
        await reader.delete(key)


async def test_concurrent_calls_each_get_their_own_reply(wire: RedisWire, reader: aioredis.Redis) -> None:
    prefix = f"wiretest:{secrets.token_hex(8)}"
    await reader.mset({f"{prefix}:get:{i}": f"value-{i}" for i in range(200)})
    await reader.set(f"{prefix}:text", "not a number")
    calls: list[tuple[str | int, ...]] = []
    expected: list[Any] = []
    for i in range(200):
        if i % 4 == 0:
            calls.append(("INCRBY", f"{prefix}:incr:{i}", i + 1))
            expected.append(i + 1)
        elif i % 4 == 1:
            calls.append(("GET", f"{prefix}:get:{i}"))
            expected.append(f"value-{i}".encode())
        elif i % 4 == 2:
            calls.append(("ECHO", f"echo-{i}"))
            expected.append(f"echo-{i}".encode())
        else:
            calls.append(("INCR", f"{prefix}:text"))
            expected.append(hiredis.ReplyError)
    try:
        replies = await asyncio.gather(*(wire.call(*c) for c in calls))
        for call, reply, want in zip(calls, replies, expected, strict=True):
            if want is hiredis.ReplyError:
                assert isinstance(reply, hiredis.ReplyError), (call, reply)
            else:
                assert reply == want, (call, reply)
        assert await reader.get(f"{prefix}:incr:40") == b"41"
    finally:
        keys = [k async for k in reader.scan_iter(match=f"{prefix}:*", count=1000)]
        await reader.delete(*keys)


async def test_an_error_reply_is_returned_and_the_connection_stays_usable(
    wire: RedisWire, reader: aioredis.Redis
) -> None:
    key = f"wiretest:{secrets.token_hex(8)}"
    await reader.set(key, "abc")
    try:
        not_a_number = await wire.call("INCR", key)
        assert isinstance(not_a_number, hiredis.ReplyError)
        assert "not an integer" in str(not_a_number)
        unknown = await wire.call("NOSUCHCOMMAND", key)
        assert isinstance(unknown, hiredis.ReplyError)
        assert str(unknown).startswith("ERR unknown command")
        assert await wire.call("PING") == b"PONG"
        assert await wire.call("GET", key) == b"abc"
    finally:
        await reader.delete(key)


async def test_a_wire_on_db_3_writes_to_db_3() -> None:
    key = f"wiretest:{secrets.token_hex(8)}"
    db3 = reader_on(3)
    db0 = reader_on(0)
    wire = RedisWire(redis_kwargs(3), 5.0)
    try:
        assert await wire.call("SET", key, "in db 3") == b"OK"
        assert await db3.get(key) == b"in db 3"
        assert await db0.get(key) is None
    finally:
        wire.close()
        await db3.delete(key)
        await db3.aclose()
        await db0.aclose()


async def test_a_refused_password_fails_the_connection() -> None:
    kwargs = redis_kwargs(0)
    kwargs["password"] = f"wrong-{secrets.token_hex(4)}"
    wire = RedisWire(kwargs, 5.0)
    try:
        with pytest.raises(RedisWireError, match="AUTH"):
            await wire.call("PING")
    finally:
        wire.close()


async def test_auth_and_select_are_sent_on_connect_over_a_unix_socket(tmp_path: Path) -> None:
    fake = FakeRedis(["answer"])
    path = tmp_path / "redis.sock"
    server = await asyncio.start_unix_server(fake.handle, path=str(path))
    wire = RedisWire({"path": str(path), "username": "alice", "password": "s3cret", "db": 5}, 5.0)
    try:
        assert await wire.call("PING") == b"PONG"
        assert await wire.call("PING") == b"PONG"
    finally:
        wire.close()
        server.close()
        await server.wait_closed()
    assert fake.commands == [[b"AUTH", b"alice", b"s3cret"], [b"SELECT", b"5"], [b"PING"], [b"PING"]]
    assert fake.connections == 1


async def test_connecting_where_nothing_listens_raises() -> None:
    wire = RedisWire({"host": "127.0.0.1", "port": free_port()}, 2.0)
    try:
        with pytest.raises(RedisWireError):
            await wire.call("PING")
    finally:
        wire.close()


async def test_no_reply_in_time_raises_and_the_next_call_reconnects() -> None:
    fake = FakeRedis(["silent", "answer"])
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    wire = RedisWire({"host": "127.0.0.1", "port": port}, 0.2)
    try:
        started = time.monotonic()
        with pytest.raises(RedisWireError, match="no redis reply"):
            await wire.call("PING")
        assert time.monotonic() - started < 5
        await asyncio.wait_for(fake.a_connection_closed.wait(), 5)  # the timed-out connection was closed
        assert await wire.call("PING") == b"PONG"
        assert fake.connections == 2
        assert fake.commands == [[b"PING"]]
    finally:
        wire.close()
        server.close()
        await server.wait_closed()


async def test_a_dropped_connection_fails_its_callers_and_the_next_call_reconnects() -> None:
    fake = FakeRedis(["drop", "answer"])
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    wire = RedisWire({"host": "127.0.0.1", "port": port}, 10.0)
    try:
        started = time.monotonic()
        with pytest.raises(RedisWireError, match="connection lost"):
            await wire.call("PING")
        assert time.monotonic() - started < 5  # failed by the lost connection, not by the timeout
        assert await wire.call("PING") == b"PONG"
        assert fake.connections == 2
    finally:
        wire.close()
        server.close()
        await server.wait_closed()


async def test_concurrent_charges_allow_exactly_the_limit_in_one_round_trip(
    layers: RedisLayers, namespace: str, reader: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    round_trips = count_round_trips(layers, monkeypatch)
    window = this_hour()
    outcomes = await asyncio.gather(*(layers.charge("sends", window, HOUR, 10) for _ in range(50)))
    assert all(o is not None for o in outcomes)
    assert sorted(o.count for o in outcomes if o and o.allowed) == list(range(1, 11))
    assert outcomes[:10] == [ChargeOutcome(True, n, 10) for n in range(1, 11)]  # in queue order
    assert outcomes[10:] == [ChargeOutcome(False, 10, 10)] * 40
    assert round_trips == [50]
    key = f"prefd:{namespace}:counter:sends@{window}"
    assert await reader.get(key) == b"10"
    assert 0 < await reader.ttl(key) <= HOUR + 60
    assert await layers.peek("sends", window) == 10


async def test_an_idempotency_key_counts_once_within_and_across_batches(
    layers: RedisLayers, namespace: str, reader: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    round_trips = count_round_trips(layers, monkeypatch)
    window = this_hour()
    first = await asyncio.gather(
        layers.charge("mails", window, HOUR, 5, idempotency_key="a"),
        layers.charge("mails", window, HOUR, 5, idempotency_key="a"),
        layers.charge("mails", window, HOUR, 5, idempotency_key="b"),
        layers.charge("mails", window, HOUR, 5),
        layers.charge("mails", window, HOUR, 5, idempotency_key="a"),
    )
    assert list(first) == [
        ChargeOutcome(True, 1, 5),
        ChargeOutcome(True, 1, 5),
        ChargeOutcome(True, 2, 5),
        ChargeOutcome(True, 3, 5),
        ChargeOutcome(True, 1, 5),
    ]
    assert round_trips == [2 + 2 + 2 + 1 + 2]
    again = await asyncio.gather(
        layers.charge("mails", window, HOUR, 5, idempotency_key="b"),
        layers.charge("mails", window, HOUR, 5, idempotency_key="c"),
    )
    assert list(again) == [ChargeOutcome(True, 2, 5), ChargeOutcome(True, 4, 5)]
    assert await layers.peek("mails", window) == 4
    assert await reader.get(f"prefd:{namespace}:counter:mails@{window}") == b"4"
    assert await reader.get(f"prefd:{namespace}:counter:mails#a") == b"1:1:5"


async def test_more_charges_than_one_round_trip_takes_are_all_answered(
    layers: RedisLayers, namespace: str, reader: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    round_trips = count_round_trips(layers, monkeypatch)
    window = this_hour()
    total = MAX_CHARGES_PER_ROUND_TRIP + 20
    limit = total + 100
    outcomes = await asyncio.gather(*(layers.charge("pushes", window, HOUR, limit) for _ in range(total)))
    assert outcomes == [ChargeOutcome(True, n, limit) for n in range(1, total + 1)]
    assert round_trips == [MAX_CHARGES_PER_ROUND_TRIP, 20]
    assert await reader.get(f"prefd:{namespace}:counter:pushes@{window}") == str(total).encode()


async def test_a_charge_reloads_the_script_after_redis_forgot_it(layers: RedisLayers, reader: aioredis.Redis) -> None:
    window = this_hour()
    assert await layers.charge("calls", window, HOUR, 3) == ChargeOutcome(True, 1, 3)
    await reader.script_flush()
    # Another process sharing this Redis may load the script again at any time: only the outcome counts.
    assert await layers.charge("calls", window, HOUR, 3) == ChargeOutcome(True, 2, 3)
    assert layers.available
    assert layers.errors == 0


async def test_a_charge_while_redis_is_unreachable_is_none() -> None:
    layers = RedisLayers(f"redis://127.0.0.1:{free_port()}/0", f"wiretest-{secrets.token_hex(6)}")
    try:
        assert await layers.charge("sends", this_hour(), HOUR, 10) is None
        assert not layers.available
        assert layers.errors == 1
        assert await layers.charge("sends", this_hour(), HOUR, 10) is None  # skipped while marked down
        assert layers.errors == 1
    finally:
        await layers.close()
