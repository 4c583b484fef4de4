"""register → stream → worker → Redis → delta → watcher, on real RabbitMQ and Redis."""

from __future__ import annotations

import asyncio

import aio_pika
import orjson
import pytest

from busreg import ConfigurationError, DeltaKind, Registry, Settings, partition_for
from busreg import constants as c
from busreg.client.groups import declare_group
from busreg.client.registration import IngestPublisher
from busreg.server.worker import Worker
from busreg.tasks import cancel_until_done
from busreg.transport.connections import connect_amqp, stream_producer
from busreg.transport.streams import StreamWriter
from busreg.wire.codec import encode_event
from busreg.wire.models import Deregister, Heartbeat, Register

from .helpers import partition_states

pytestmark = pytest.mark.servers


async def test_register_is_visible_in_snapshot_and_announced(
    busreg_worker: Worker, busreg_registry: Registry
) -> None:
    view = await busreg_registry.watch("inventory")
    changes = view.changes()
    reg = await busreg_registry.register(
        "inventory",
        address="127.0.0.1:8080",
        instance_id="inv-1",
        zone="eu-1a",
        metadata={"version": "2.1"},
    )
    async with asyncio.timeout(10):
        change = await anext(changes)
    assert change.kind is DeltaKind.ADDED
    assert change.instance.instance_id == "inv-1"
    assert change.instance.metadata == {"version": "2.1"}
    assert change.revision == 1

    snap = await busreg_registry.snapshot("inventory")
    assert [i.instance_id for i in snap.instances] == ["inv-1"]
    assert snap.revision == 1
    assert snap.instances[0].zone == "eu-1a"

    await reg.update(metadata={"version": "2.2"})
    async with asyncio.timeout(10):
        change = await anext(changes)
    assert (change.kind, change.revision) == (DeltaKind.MODIFIED, 2)
    assert change.instance.metadata == {"version": "2.2"}

    await reg.deregister()
    async with asyncio.timeout(10):
        change = await anext(changes)
    assert (change.kind, change.revision, change.reason) == (
        DeltaKind.REMOVED,
        3,
        "deregistered",
    )
    assert (await busreg_registry.snapshot("inventory")).instances == []


async def test_unknown_service_has_an_empty_snapshot(
    busreg_worker: Worker, busreg_registry: Registry
) -> None:
    snap = await busreg_registry.snapshot("nobody")
    assert (snap.revision, snap.instances) == (0, [])


async def test_invalid_registration_is_refused_before_sending(busreg_registry: Registry) -> None:
    with pytest.raises(ConfigurationError, match="address"):
        await busreg_registry.register("inventory", address="no-port")
    with pytest.raises(ConfigurationError, match="service"):
        await busreg_registry.register("bad name!", address="127.0.0.1:1")


async def test_amqp_091_publisher_writes_into_the_same_partition(
    busreg_worker: Worker, busreg_registry: Registry, busreg_namespace: Settings
) -> None:
    """Clients in other languages need only AMQP and the JSON Schema."""
    settings = busreg_namespace
    view = await busreg_registry.watch("billing")
    event = Register(
        service="billing", instance_id="bill-1", incarnation=1, seq=1, address="10.1.2.3:80"
    )
    k = partition_for("billing", settings.partitions)
    conn = await connect_amqp(settings, "plain-amqp-publisher")
    try:
        channel = await conn.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(c.ingest_super_stream(settings.namespace))
        await exchange.publish(
            aio_pika.Message(encode_event(event), content_type="application/json", user_id="guest"),
            routing_key=str(k),
        )
    finally:
        await conn.close()
    await view.wait_for(lambda i: "bill-1" in i, timeout=10)
    assert view.instances["bill-1"].address == "10.1.2.3:80"


async def test_duplicates_and_reordering_change_nothing(
    busreg_worker: Worker, busreg_registry: Registry, busreg_namespace: Settings
) -> None:
    settings = busreg_namespace
    view = await busreg_registry.watch("orders")
    changes = view.changes()
    writer = StreamWriter(settings, "test-dup")
    publisher = IngestPublisher(writer, settings)

    def reg(
        seq: int, version: str, kind: type[Register] | type[Heartbeat] = Heartbeat
    ) -> Register | Heartbeat:
        return kind(
            service="orders",
            instance_id="o-1",
            incarnation=7,
            seq=seq,
            address="127.0.0.1:7000",
            metadata={"v": version},
        )

    try:
        sequence = [
            reg(1, "a", Register),
            reg(3, "c"),  # applied: added(a), modified(c)
            reg(1, "a", Register),
            reg(2, "b"),  # duplicate and older: nothing
            reg(3, "c"),  # duplicate: nothing
            Deregister(service="orders", instance_id="o-1", incarnation=7, seq=4),
            reg(2, "b"),
            reg(3, "c"),  # late heartbeats after deregister
            # a new run of the same instance id registers again
            Register(
                service="orders", instance_id="o-1", incarnation=8, seq=1, address="127.0.0.1:7001"
            ),
        ]
        for event in sequence:
            await publisher.publish(event, timeout=5)
        seen = []
        async with asyncio.timeout(10):
            while len(seen) < 4:
                seen.append(await anext(changes))
    finally:
        await writer.close()
    assert [(ch.kind, ch.revision) for ch in seen] == [
        (DeltaKind.ADDED, 1),
        (DeltaKind.MODIFIED, 2),
        (DeltaKind.REMOVED, 3),
        (DeltaKind.ADDED, 4),
    ]
    assert seen[1].instance.metadata == {"v": "c"}
    assert seen[3].instance.incarnation == 8
    # nothing else arrives: the stale events produced no delta (the final snapshot agrees)
    snap = await busreg_registry.snapshot("orders")
    assert snap.revision == 4
    assert [i.address for i in snap.instances] == ["127.0.0.1:7001"]
    states = await partition_states(settings)
    k = partition_for("orders", settings.partitions)
    assert int(states[k]["stale"]) == 5


async def test_consumer_group_members_share_each_delta_once(
    busreg_worker: Worker, busreg_namespace: Settings
) -> None:
    settings = busreg_namespace
    received: dict[str, list[int]] = {"a": [], "b": []}
    other_group: list[int] = []
    total = 30
    async with (
        Registry(settings) as member_a,
        Registry(settings) as member_b,
        Registry(settings) as auditor,
        Registry(settings) as registrant,
    ):
        done = asyncio.Event()

        async def consume(client: Registry, name: str, group: str, into: list[int]) -> None:
            async with client.consume_group("payments", group, prefetch=2) as messages:
                async for message in messages:
                    into.append(message.delta.revision)
                    await message.ack()
                    if sum(map(len, received.values())) >= total and len(other_group) >= total:
                        done.set()

        # declare both group queues before any member (RabbitMQ 3.10 can fail a consume on a
        # quorum queue that several connections are declaring at that very moment), and
        # before any delta is published
        conn = await connect_amqp(settings, "group-setup")
        try:
            channel = await conn.channel()
            for group in ("ledger", "audit"):
                await declare_group(channel, settings.namespace, "payments", group)
        finally:
            await conn.close()

        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(consume(member_a, "a", "ledger", received["a"])),
                tg.create_task(consume(member_b, "b", "ledger", received["b"])),
                tg.create_task(consume(auditor, "x", "audit", other_group)),
            ]
            view = await registrant.watch("payments")
            for n in range(total):
                await registrant.register(
                    "payments", address=f"127.0.0.1:{9000 + n}", instance_id=f"p-{n}"
                )
            await view.wait_for(lambda i: len(i) == total, timeout=15)
            async with asyncio.timeout(15):
                await done.wait()
            await cancel_until_done(tasks)
    together = sorted(received["a"] + received["b"])
    assert together == list(range(1, total + 1)), "each delta exactly once across the group"
    assert received["a"], "members take turns"
    assert received["b"], "members take turns"
    assert sorted(other_group) == list(range(1, total + 1)), "another group gets everything"
    conn = await connect_amqp(settings, "cleanup")
    try:
        ch = await conn.channel()
        for q in ("ledger", "audit"):
            await ch.queue_delete(c.group_queue(settings.namespace, "payments", q))
    finally:
        await conn.close()


async def test_dead_letter_is_published_with_reason(
    busreg_worker: Worker, busreg_registry: Registry, busreg_namespace: Settings
) -> None:
    settings = busreg_namespace
    producer = await stream_producer(settings, "test-bad")
    try:
        from rstream import RawMessage

        stream = c.ingest_partition(settings.namespace, 0)
        await producer.send_wait(stream, RawMessage(b'{"v": 1, "type": "register", "nope'))
        await producer.send_wait(stream, RawMessage(b'{"v": 9, "type": "tick", "worker": "x"}'))
    finally:
        await producer.close()
    conn = await connect_amqp(settings, "dl-reader")
    try:
        channel = await conn.channel()
        queue = await channel.get_queue(c.dead_letter_queue(settings.namespace))
        got = []
        async with asyncio.timeout(10):
            while len(got) < 2:
                message = await queue.get(no_ack=True, fail=False)
                if message is None:
                    await asyncio.sleep(0.02)  # basic.get has no blocking form
                    continue
                got.append(orjson.loads(message.body))
    finally:
        await conn.close()
    assert [g["reason"] for g in got] == ["malformed", "unknown-version"]
    assert got[0]["partition"] == 0
    # and the partition carried on: a registration after the garbage is applied
    view = await busreg_registry.watch("after-garbage")
    await busreg_registry.register("after-garbage", address="127.0.0.1:1", instance_id="ok")
    await view.wait_for(lambda i: "ok" in i, timeout=10)
