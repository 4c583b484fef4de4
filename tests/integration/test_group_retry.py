"""A consumer-group member that gives a poison delta back with ``retry()`` gets it again
up to the delivery limit, and then the broker dead-letters it (issue 11, item 10; the
unit test pins ``reject(requeue=True)``, which RabbitMQ 4.3 still counts).

Guards invariant 7: a poison delta neither blocks its group for ever nor disappears: it
ends up in ``<ns>.deadletter`` for operators.
"""

from __future__ import annotations

import asyncio

import pytest

from busreg import Registry, Settings
from busreg import constants as c
from busreg.ops.deadletters import read_dead_letters
from busreg.server.worker import Worker
from busreg.tasks import cancel_until_done
from busreg.transport.connections import connect_amqp

from .helpers import eventually

pytestmark = pytest.mark.servers


async def test_a_retried_poison_delta_is_dead_lettered_after_the_limit(
    busreg_worker: Worker, busreg_namespace: Settings
) -> None:
    settings = busreg_namespace
    deliveries = 0
    try:
        async with (
            Registry(settings) as registry,
            registry.consume_group("poisoned", "g") as messages,
        ):
            await registry.register("poisoned", address="127.0.0.1:7000", instance_id="p1")

            async def give_back_until_gone() -> None:
                nonlocal deliveries
                async for message in messages:
                    assert message.delta.instance.instance_id == "p1"
                    deliveries += 1
                    await message.retry()

            task = asyncio.create_task(give_back_until_gone())
            try:
                _total, dead = await eventually(
                    lambda: read_dead_letters(settings, limit=5),
                    lambda got: got[0] >= 1,
                    timeout=20,
                    what="the poison delta in the dead-letter queue",
                )
            finally:
                await cancel_until_done([task])
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        assert [d["kind"] for d in dead] == ["delta"]
        assert dead[0]["reason"] == "delivery_limit"
        assert '"p1"' in dead[0]["body"]
        assert deliveries == c.DELIVERY_LIMIT + 1, deliveries
    finally:
        conn = await connect_amqp(settings, "test-cleanup")
        try:
            channel = await conn.channel()
            await channel.queue_delete(c.group_queue(settings.namespace, "poisoned", "g"))
        finally:
            await conn.close()
