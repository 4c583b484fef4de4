"""The paths between the big faults: a reply lost after the command ran, a lost increment
after a Redis failover, a request that fails in an unexpected way, a flood of garbage.

Each test names the invariant of the design brief (shared/DESIGN.md §3) it guards, and
each failed on the code before its fix (see the commit that added it).
"""

from __future__ import annotations

import asyncio
import base64
import os
from urllib.parse import urlsplit

import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage

from busreg import BusregError, ConnectionFailed, Registry, Settings
from busreg import constants as c
from busreg.ops.deadletters import read_dead_letters
from busreg.server.store import PartitionStore
from busreg.server.worker import Worker
from busreg.testing import running_worker
from busreg.transport.connections import connect_amqp, connect_redis
from busreg.transport.streams import StreamWriter
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.servers


async def test_outbox_trim_run_twice_trims_once(busreg_namespace: Settings) -> None:
    """Invariant 1 (a committed change reaches its exchange): the drain's trim may run and
    lose its reply, then be retried. Before, ``LTRIM done -1`` ran twice dropped ``done``
    entries that were never published (consumer groups lost them for good)."""
    settings = busreg_namespace
    redis = await connect_redis(settings)
    try:
        store = PartitionStore(redis, settings.namespace)
        lease = await store.acquire(0, "w", 5_000)
        assert lease is not None
        box = store.prefix(0) + c.KEY_OUTBOX
        await redis.rpush(box, *[f"e{i}" for i in range(5)])

        base, entries = await store.outbox_step(lease, -1, 10)
        assert entries == [b"e0", b"e1", b"e2", b"e3", b"e4"]
        # e0 and e1 confirmed; the trim runs, its reply is lost, the drain runs it again
        first = await store.outbox_step(lease, base + 2, 10)
        again = await store.outbox_step(lease, base + 2, 10)
        assert first == again == (base + 2, [b"e2", b"e3", b"e4"])
        # entries appended meanwhile keep their numbers
        await redis.rpush(box, "e5")
        assert await store.outbox_step(lease, base + 4, 10) == (base + 4, [b"e4", b"e5"])
        assert await store.outbox_step(lease, base + 6, 10) == (base + 6, [])
        assert await store.outbox_step(lease, base + 6, 10) == (base + 6, [])
    finally:
        await redis.aclose()


async def test_an_outbox_step_whose_reply_is_lost_loses_nothing(busreg_namespace: Settings) -> None:
    """Invariant 1, tried through a proxy that forwards the script and drops its reply:
    the step ran (its trim is done), the caller saw a connection error and runs it again,
    as the drain does. Nothing beyond what was confirmed may be trimmed."""
    settings = busreg_namespace
    url = urlsplit(settings.redis_url)
    async with FaultProxy(url.hostname or "127.0.0.1", url.port or 6379) as proxy:
        proxied = settings.model_copy(update={"redis_url": proxy.url_for(settings.redis_url)})
        redis = await connect_redis(proxied)
        try:
            store = PartitionStore(redis, settings.namespace)
            lease = await store.acquire(3, "w", 5_000)
            assert lease is not None
            await redis.rpush(store.prefix(3) + c.KEY_OUTBOX, *[f"e{i}" for i in range(5)])
            base, _ = await store.outbox_step(lease, -1, 10)
            proxy.drop_next_reply()
            with pytest.raises(ConnectionFailed):
                await store.outbox_step(lease, base + 2, 10)
            assert proxy.stats.faults["drop"] == 1
            assert await store.outbox_step(lease, base + 2, 10) == (base + 2, [b"e2", b"e3", b"e4"])
        finally:
            await redis.aclose()


async def test_fencing_tokens_never_repeat_after_a_lost_increment(
    busreg_namespace: Settings,
) -> None:
    """Invariant 3 (one writer per partition): Redis replication is asynchronous, so a
    failover can lose the last ``fence_n`` increment and the lease. Before, the next
    acquisition was handed the very token the first owner still held; both could write."""
    settings = busreg_namespace
    redis = await connect_redis(settings)
    try:
        store = PartitionStore(redis, settings.namespace)
        a = await store.acquire(1, "a", 5_000)
        assert a is not None
        # what a promoted replica that missed the last writes looks like
        await redis.hincrby(store.prefix(1) + c.KEY_STATE, "fence_n", -1)
        await redis.delete(store.prefix(1) + c.KEY_LEASE)
        b = await store.acquire(1, "b", 5_000)
        assert b is not None
        assert b.epoch == a.epoch
        assert b.token != a.token
        # and the first owner's writes are refused
        from busreg.errors import Fenced

        with pytest.raises(Fenced):
            await store.outbox_step(a, -1, 1)
    finally:
        await redis.aclose()


async def test_rpc_answers_every_request_even_on_unexpected_errors(
    busreg_namespace: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Snapshots always answer: a request that fails with a non-busreg exception used to
    stay unacked; after PREFETCH (4) of them the worker answered nobody."""
    settings = busreg_namespace
    calls = 0

    async def broken(self: PartitionStore, partition: int, service: str) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("boom")

    async with running_worker(settings), Registry(settings) as registry:
        monkeypatch.setattr(PartitionStore, "snapshot", broken)
        for _ in range(6):
            # answered at once with the error, not a RequestTimeout after request_timeout
            async with asyncio.timeout(2):
                with pytest.raises(BusregError, match="internal: RuntimeError: boom"):
                    await registry.snapshot("inventory")
        monkeypatch.undo()
        snapshot = await registry.snapshot("inventory")
        assert snapshot.revision == 0
    assert calls == 6


async def test_a_dead_letter_keeps_a_reference_not_the_message(
    busreg_worker: Worker, busreg_namespace: Settings
) -> None:
    """Invariant 6 (bad input never stops a partition) without filling Redis: a dead letter
    used to copy up to 64 KiB (87 KB of base64) of the bad message into the outbox."""
    settings = busreg_namespace
    garbage = b"\x00" + os.urandom(60_000)
    writer = StreamWriter(settings, "garbage")
    try:
        await writer.send(c.ingest_partition(settings.namespace, 2), garbage, 5)
    finally:
        await writer.close()
    conn = await connect_amqp(settings, "dead-letter-reader")
    try:
        channel = await conn.channel()
        queue = await channel.declare_queue(c.dead_letter_queue(settings.namespace), passive=True)
        got: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()

        async def take(m: AbstractIncomingMessage) -> None:
            if not got.done():
                got.set_result(m)

        await queue.consume(take, no_ack=True)
        async with asyncio.timeout(10):
            message = await got
    finally:
        await conn.close()
    assert len(message.body) < 2_000  # was ~87 KB
    record = orjson.loads(message.body)
    assert record["size"] == len(garbage)
    assert (record["stream"], record["partition"]) == (c.ingest_partition(settings.namespace, 2), 2)
    assert base64.b64decode(record["body_b64"]) == garbage[:512]
    described = await read_dead_letters(settings, wait=0.2)
    assert described[0] == 0  # taken above
