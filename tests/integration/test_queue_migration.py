"""``<ns>.rpc`` and ``<ns>.deadletter`` are quorum queues, and a namespace created by an
older busreg (classic queues) is migrated by ``topology apply`` with its messages kept,
while its workers keep answering (issue 11, item 8).

Guards invariant 7 (nothing is lost on the way: dead letters are kept for operators) and
the RPC path's availability: a snapshot request is answered before, during and after.
"""

from __future__ import annotations

import aio_pika
import pytest

from busreg import Registry, Settings
from busreg import constants as c
from busreg.testing import cleanup_namespace, running_worker
from busreg.transport.connections import connect_amqp
from busreg.transport.migration import MIGRATING_SUFFIX
from busreg.transport.queues import queue_has_arguments
from busreg.transport.topology import apply_topology, declare_ingest

pytestmark = [pytest.mark.servers, pytest.mark.busreg(partitions=2)]

OLD_RPC = {"x-message-ttl": c.RPC_MESSAGE_TTL_MS}
OLD_DLQ = {"x-max-length": c.DEAD_LETTER_MAX, "x-overflow": "drop-head"}


async def _old_namespace(conn: aio_pika.abc.AbstractConnection, settings: Settings) -> None:
    """The topology as busreg declared it before: classic rpc and dead-letter queues,
    with three dead letters in the queue."""
    ns = settings.namespace
    channel = await conn.channel(publisher_confirms=True)
    await channel.declare_queue(c.rpc_queue(ns), durable=True, arguments=OLD_RPC)
    await channel.declare_queue(c.dead_letter_queue(ns), durable=True, arguments=OLD_DLQ)
    for n in range(3):
        await channel.default_exchange.publish(
            aio_pika.Message(f"dead {n}".encode(), headers={"x-busreg-reason": f"r{n}"}),
            routing_key=c.dead_letter_queue(ns),
        )
    await channel.close()
    await apply_topology_without_queues(conn, settings)


async def apply_topology_without_queues(
    conn: aio_pika.abc.AbstractConnection, settings: Settings
) -> None:
    """Streams and exchanges as apply_topology declares them, the queues left classic."""
    channel = await conn.channel()
    ns = settings.namespace
    await declare_ingest(conn, channel, settings)
    dlx = await channel.declare_exchange(
        c.dead_letter_exchange(ns), aio_pika.ExchangeType.FANOUT, durable=True
    )
    dlq = await channel.declare_queue(c.dead_letter_queue(ns), durable=True, arguments=OLD_DLQ)
    await dlq.bind(dlx)
    await channel.close()


async def _drain(conn: aio_pika.abc.AbstractConnection, name: str) -> list[tuple[bytes, str]]:
    channel = await conn.channel()
    queue = await channel.declare_queue(name, passive=True)
    got = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        got.append((message.body, str((message.headers or {}).get("x-busreg-reason"))))
    await channel.close()
    return got


async def test_classic_queues_become_quorum_and_keep_messages_while_workers_answer(
    busreg_settings: Settings,
) -> None:
    settings = busreg_settings
    ns = settings.namespace
    conn = await connect_amqp(settings, "test-migration")
    try:
        await _old_namespace(conn, settings)
        assert await queue_has_arguments(conn, c.rpc_queue(ns), c.rpc_queue_arguments()) is False
        async with running_worker(settings) as worker, Registry(settings) as registry:
            # a new worker serves the old classic queue as it is
            before = await registry.snapshot("svc-a")
            assert before.instances == []
            served = worker.snapshot_requests
            await apply_topology(conn, settings)
            for name, args in (
                (c.rpc_queue(ns), c.rpc_queue_arguments()),
                (c.dead_letter_queue(ns), c.dead_letter_queue_arguments()),
            ):
                assert await queue_has_arguments(conn, name, args) is True, name
                assert await queue_has_arguments(conn, name + MIGRATING_SUFFIX, {}) is None
            # the worker's consumer moved to the new queue: requests are still answered
            await registry.register("svc-a", address="127.0.0.1:7001", instance_id="a1")
            after = await registry.snapshot("svc-a")
            assert [i.instance_id for i in after.instances] == ["a1"]
            assert worker.snapshot_requests > served
        # the dead letters came through, in order, headers included
        assert await _drain(conn, c.dead_letter_queue(ns)) == [
            (f"dead {n}".encode(), f"r{n}") for n in range(3)
        ]
        # and running it again changes nothing
        await apply_topology(conn, settings)
    finally:
        await conn.close()
        await cleanup_namespace(settings)


async def test_an_interrupted_migration_is_finished_by_the_next_apply(
    busreg_settings: Settings,
) -> None:
    """The first run died after setting the messages aside (the old queue is gone, the
    messages are in ``.migrating``): the next apply declares the quorum queue and moves
    them back."""
    settings = busreg_settings
    ns = settings.namespace
    dlq = c.dead_letter_queue(ns)
    conn = await connect_amqp(settings, "test-migration")
    try:
        channel = await conn.channel(publisher_confirms=True)
        await channel.declare_queue(
            dlq + MIGRATING_SUFFIX, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await channel.default_exchange.publish(
            aio_pika.Message(b"kept", headers={"x-busreg-reason": "x"}),
            routing_key=dlq + MIGRATING_SUFFIX,
        )
        await channel.close()
        await apply_topology(conn, settings)
        assert await queue_has_arguments(conn, dlq, c.dead_letter_queue_arguments()) is True
        assert await queue_has_arguments(conn, dlq + MIGRATING_SUFFIX, {}) is None
        assert await _drain(conn, dlq) == [(b"kept", "x")]
    finally:
        await conn.close()
        await cleanup_namespace(settings)
