"""tests/faultproxy.py against a real Redis: each fault does what failure tests rely on.

The clients here never retry (``retry=None``) and use one connection
(``single_connection_client``), so a fault shows up as an error on exactly the call that
hit it: a pool would quietly reconnect a connection it finds dead at checkout, and a retry
would hide the "ran but reply lost" case by running the command again.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
import redis.exceptions
from redis.asyncio import Redis

from busreg.testing import BusregServers
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.servers


@pytest.fixture
def redis_url(busreg_servers: BusregServers) -> str:
    # busreg_servers: BUSREG_TEST_REDIS_URL, else containers, else skip (a failure under CI)
    return busreg_servers.redis_url


@pytest.fixture
def prefix() -> str:
    return f"faultproxy:{uuid.uuid4().hex[:10]}:"


@pytest_asyncio.fixture
async def direct(redis_url: str, prefix: str) -> AsyncIterator[Redis]:
    """A client straight to Redis (no proxy): the server's own view, and key cleanup."""
    client = Redis.from_url(redis_url, socket_timeout=5)
    try:
        await client.ping()  # an unreachable server fails the test here, never skips it
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest_asyncio.fixture
async def proxy(redis_url: str, direct: Redis) -> AsyncIterator[FaultProxy]:
    parts = urlsplit(redis_url)
    async with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as p:
        yield p


def via(proxy: FaultProxy, redis_url: str) -> Redis:
    """A client through the proxy: one connection, no retries, 1 s socket timeout."""
    return Redis.from_url(
        proxy.url_for(redis_url), retry=None, socket_timeout=1, single_connection_client=True
    )


@pytest_asyncio.fixture
async def client(proxy: FaultProxy, redis_url: str) -> AsyncIterator[Redis]:
    c = via(proxy, redis_url)
    try:
        await c.ping()  # connected and past the handshake (SELECT) before any fault
        yield c
    finally:
        await c.aclose()


async def test_plain_forwarding(proxy: FaultProxy, client: Redis, prefix: str) -> None:
    assert await client.ping() is True
    await client.set(f"{prefix}k", b"v" * 100_000)  # more than one chunk each way
    assert await client.get(f"{prefix}k") == b"v" * 100_000
    assert proxy.stats.connections == 1
    assert proxy.stats.bytes_up > 100_000
    assert proxy.stats.bytes_down > 100_000
    assert proxy.stats.faults_injected == 0


async def test_url_for_keeps_credentials_and_path(proxy: FaultProxy) -> None:
    url = proxy.url_for("redis://user:pw@10.0.0.1:6379/15?x=1")
    assert url == f"redis://user:pw@127.0.0.1:{proxy.port}/15?x=1"


async def test_delay_adds_latency(proxy: FaultProxy, client: Redis, prefix: str) -> None:
    await client.set(f"{prefix}k", b"v")
    proxy.delay(0.2)
    started = time.monotonic()
    assert await client.get(f"{prefix}k") == b"v"
    assert time.monotonic() - started >= 0.2
    proxy.clear()
    started = time.monotonic()
    assert await client.get(f"{prefix}k") == b"v"
    assert time.monotonic() - started < 0.2
    assert proxy.stats.faults["delay"] == 1


async def test_stall_times_out_and_resume_recovers(
    proxy: FaultProxy, client: Redis, prefix: str, direct: Redis
) -> None:
    await direct.set(f"{prefix}k", b"v")
    proxy.stall()
    with pytest.raises(redis.exceptions.TimeoutError):
        await client.get(f"{prefix}k")
    proxy.resume()
    # redis-py dropped the timed-out connection; the next call opens a new one
    assert await client.get(f"{prefix}k") == b"v"
    assert proxy.stats.connections == 2
    assert proxy.stats.faults["stall"] == 1


async def test_stall_new_connections_holds_only_those(
    proxy: FaultProxy, client: Redis, redis_url: str, prefix: str, direct: Redis
) -> None:
    await direct.set(f"{prefix}k", b"v")
    proxy.stall_new_connections(1)
    late = via(proxy, redis_url)
    try:
        with pytest.raises(redis.exceptions.TimeoutError):
            await late.get(f"{prefix}k")  # the new connection's handshake is held
        assert await client.get(f"{prefix}k") == b"v"  # the open one still flows
        proxy.resume()
        assert await late.get(f"{prefix}k") == b"v"  # (its retry is a third connection)
        assert proxy.stats.faults["stall"] == 1
    finally:
        await late.aclose()


async def test_reset_all_breaks_open_connection(
    proxy: FaultProxy, client: Redis, prefix: str
) -> None:
    assert proxy.reset_all() == 1
    with pytest.raises(redis.exceptions.ConnectionError):
        await client.get(f"{prefix}k")
    assert proxy.stats.faults["reset"] == 1
    assert await client.ping() is True  # new connections are still accepted
    assert proxy.stats.connections == 2


async def test_refuse_resets_new_connections_only(
    proxy: FaultProxy, client: Redis, redis_url: str
) -> None:
    proxy.refuse(True)
    assert await client.ping() is True  # the open connection is untouched
    late = via(proxy, redis_url)
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await late.ping()
        assert proxy.stats.faults["refuse"] == 1
        proxy.refuse(False)
        assert await late.ping() is True
    finally:
        await late.aclose()


async def test_drop_next_reply_runs_command_but_loses_reply(
    proxy: FaultProxy, client: Redis, prefix: str, direct: Redis
) -> None:
    """The case a blind retry gets wrong: the client sees an error, the INCR happened."""
    key = f"{prefix}counter"
    proxy.drop_next_reply()
    with pytest.raises(redis.exceptions.ConnectionError):
        await client.incr(key)
    assert await direct.get(key) == b"1"
    assert proxy.stats.faults["drop"] == 1
    assert proxy.stats.faults["reset"] == 1
    # the budget is spent: the next reply arrives
    assert await client.incr(key) == 2


async def test_close_leaves_no_tasks_and_resets_clients(redis_url: str, direct: Redis) -> None:
    before = asyncio.all_tasks()
    parts = urlsplit(redis_url)
    async with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        c = via(proxy, redis_url)
        try:
            await c.ping()
            proxy.stall("down")
            chaos = proxy.chaos(seed=1, rate=1.0, duration=60)
            assert proxy.open_connections == 1
        except BaseException:
            await c.aclose()
            raise
    try:
        assert chaos.cancelled()
        assert asyncio.all_tasks() == before
        assert proxy.open_connections == 0
        with pytest.raises(redis.exceptions.ConnectionError):
            await c.ping()
    finally:
        await c.aclose()


async def test_chaos_is_bounded_and_counted(proxy: FaultProxy, redis_url: str, prefix: str) -> None:
    c = via(proxy, redis_url)
    ok = failed = 0
    chaos = proxy.chaos(seed=42, rate=25.0, max_faults=20, max_delay=0.05, max_hold=0.1)
    try:
        async with asyncio.timeout(8):  # hang guard: chaos ends after 20 faults
            while not chaos.done():
                try:
                    await c.set(f"{prefix}k", b"v")
                    assert await c.get(f"{prefix}k") == b"v"
                    ok += 1
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    failed += 1
                    # back off until the next fault or the end, bounded: no busy reconnect loop
                    await asyncio.wait({chaos}, timeout=0.01)
        await chaos  # re-raises a bug in the chaos task
        assert ok > 0
        assert proxy.stats.faults_injected > 0
        assert proxy.stats.as_dict()["faults_injected"] == proxy.stats.faults_injected
        # chaos cleared its faults on the way out: plain forwarding again
        assert await c.ping() is True
    finally:
        await c.aclose()
