"""FastStream integration: consume a service's deltas in a consumer group.

The short way, ``group_subscriber``: the handler gets each ``Delta``; returning acks it,
raising gives it back for redelivery (``reject(requeue=True)``, counted by the broker); after
``busreg.client.groups.DELIVERY_LIMIT`` redeliveries (measured on RabbitMQ 3.10: 6 deliveries in
all for the limit of 5) the broker dead-letters it to ``<ns>.deadletter`` with an
``x-death`` header (reason ``delivery_limit``), so one poison delta never blocks the
group. A body that is not a valid delta is rejected at once (dead-lettered: it will never
become valid)::

    from faststream.rabbit import RabbitBroker
    from busreg import Delta, Settings
    from busreg.integrations.faststream import group_subscriber

    broker = RabbitBroker(settings.amqp_urls()[0])

    @group_subscriber(broker, settings, "inventory", "audit")
    async def on_change(delta: Delta) -> None:
        ...                    # make the effect durable; return = ack, raise = redeliver

The explicit way, ``group_subscription``, for a handler that acks itself::

    from faststream import AckPolicy
    from faststream.rabbit import RabbitMessage

    queue, exchange = group_subscription(settings, "inventory", "audit")

    @broker.subscriber(queue, exchange, ack_policy=AckPolicy.MANUAL)
    async def on_change(delta: Delta, msg: RabbitMessage) -> None:
        ...                    # make the effect durable first
        await msg.ack()        # then ack: a crash before this redelivers the delta

Either way the queue is the one ``Registry.consume_group`` uses (quorum, bounded
redelivery, dead-lettered after ``DELIVERY_LIMIT`` redeliveries), so Python and FastStream
members can share a group. Pair with ``faststream_app.register_app`` to register the app.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from faststream import AckPolicy
from faststream.rabbit import (
    Channel,
    ExchangeType,
    QueueType,
    RabbitBroker,
    RabbitExchange,
    RabbitQueue,
    RabbitRouter,
)
from faststream.rabbit.annotations import RabbitMessage
from pydantic import ValidationError

from busreg import constants as c
from busreg.constants import DELIVERY_LIMIT
from busreg.settings import Settings
from busreg.transport.topology import group_queue_arguments
from busreg.wire.models import Delta, validation_message

__all__ = ["DELIVERY_LIMIT", "DeltaHandler", "group_subscriber", "group_subscription"]

log = logging.getLogger("busreg.faststream")

#: What ``group_subscriber`` decorates: an async function of one delta.
DeltaHandler = Callable[[Delta], Awaitable[object]]


def group_subscription(
    settings: Settings, service: str, group: str
) -> tuple[RabbitQueue, RabbitExchange]:
    """Queue and exchange for ``@broker.subscriber(queue, exchange, ...)``."""
    exchange = RabbitExchange(
        c.service_exchange(settings.namespace, service), type=ExchangeType.TOPIC, durable=True
    )
    queue = RabbitQueue(  # type: ignore[call-overload]
        c.group_queue(settings.namespace, service, group),
        queue_type=QueueType.QUORUM,
        durable=True,
        arguments=group_queue_arguments(settings.namespace),
        routing_key="#",
    )
    return queue, exchange


def group_subscriber(
    broker: RabbitBroker | RabbitRouter,
    settings: Settings,
    service: str,
    group: str,
    *,
    prefetch: int = 16,
    title: str | None = None,
) -> Callable[[DeltaHandler], DeltaHandler]:
    """Decorator: run the handler for each delta of ``service`` delivered to this member of
    ``group``, with manual acks (ack after success, reject-requeue on error, bounded by the
    queue's delivery limit, then dead-lettered). ``prefetch`` bounds unacked deltas per
    member (fair dispatch). Returns the handler unchanged (call it directly in tests)."""
    queue, exchange = group_subscription(settings, service, group)

    def decorate(handler: DeltaHandler) -> DeltaHandler:
        name = getattr(handler, "__name__", "handler")

        async def busreg_group_member(message: RabbitMessage) -> None:
            try:
                delta = Delta.model_validate_json(message.body)
            except ValidationError as exc:
                log.warning(
                    "group %s of %s: not a delta, dead-lettered: %s",
                    group,
                    service,
                    validation_message(exc),
                )
                await message.reject(requeue=False)
                return
            try:
                await handler(delta)
            except Exception:
                log.exception(
                    "group %s of %s: %s failed on revision %d; redelivering (at most %d times)",
                    group,
                    service,
                    name,
                    delta.revision,
                    DELIVERY_LIMIT,
                )
                # reject, not nack: RabbitMQ 4.3 counts only rejects towards the limit
                await message.reject(requeue=True)
                return
            await message.ack()

        busreg_group_member.__qualname__ = busreg_group_member.__name__ = f"{name}_group_member"
        subscriber: Any = broker.subscriber(
            queue,
            exchange,
            ack_policy=AckPolicy.MANUAL,
            channel=Channel(prefetch_count=prefetch),
            title=title,
            description=f"Deltas of {service!r} for consumer group {group!r}",
        )
        subscriber(busreg_group_member)
        return handler

    return decorate
