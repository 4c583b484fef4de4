"""Consumer groups: one shared, durable queue per (service, group) on the service's exchange.

Members of a group take turns (competing consumers with a prefetch window, the seed's
"fair dispatch"); each delta is processed once per group, acknowledged manually after its
effect is durable. A delta whose handler keeps failing is redelivered at most
``DELIVERY_LIMIT`` times (quorum queue ``x-delivery-limit``) and then dead-lettered, so one
poison message cannot block a group. Different groups, and plain watchers, each get every
delta.

    async with registry.consume_group("inventory", "billing") as deltas:
        async for message in deltas:
            handle(message.delta)
            await message.ack()
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from busreg import constants as c
from busreg.transport.connections import translate
from busreg.transport.topology import declare_service_exchange, group_queue_arguments
from busreg.wire.models import Delta

__all__ = ["DELIVERY_LIMIT", "GroupMessage", "consume_group"]

DELIVERY_LIMIT = c.DELIVERY_LIMIT


async def declare_group(
    channel: AbstractChannel, namespace: str, service: str, group: str
) -> AbstractQueue:
    with translate(f"declare group {group} of {service}"):
        exchange = await declare_service_exchange(channel, namespace, service)
        queue = await channel.declare_queue(
            c.group_queue(namespace, service, group),
            durable=True,
            arguments={"x-queue-type": "quorum", **group_queue_arguments(namespace)},
        )
        await queue.bind(exchange, routing_key="#")
    return queue


class GroupMessage:
    """A delta delivered to one member of a group; ``ack()`` once handled."""

    def __init__(self, message: AbstractIncomingMessage) -> None:
        self._message = message
        self.delta = Delta.model_validate_json(message.body)
        self.redelivered = bool(message.redelivered)

    async def ack(self) -> None:
        with translate("group ack"):
            await self._message.ack()

    async def retry(self) -> None:
        """Give it back for redelivery (counts towards the delivery limit).

        ``basic.reject``, not ``basic.nack``: from RabbitMQ 4.3 on, a nack with requeue no
        longer counts towards a quorum queue's delivery limit, so a poison delta would be
        redelivered for ever."""
        with translate("group requeue"):
            await self._message.reject(requeue=True)


@asynccontextmanager
async def consume_group(
    channel: AbstractChannel, namespace: str, service: str, group: str, *, prefetch: int = 16
) -> AsyncIterator[AsyncIterator[GroupMessage]]:
    with translate("group prefetch"):
        await channel.set_qos(prefetch_count=prefetch)
    queue = await declare_group(channel, namespace, service, group)

    async def messages() -> AsyncIterator[GroupMessage]:
        with translate(f"consume group {group}"):
            async with queue.iterator() as it:
                async for raw in it:
                    yield GroupMessage(raw)

    yield messages()
