"""Small queue operations several parts need: probes on throwaway channels, and the
exclusive queues of watchers and RPC replies.

A failed passive (or mismatching) declare closes its channel, so every probe opens a
channel of its own and closes it after.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue, AbstractRobustChannel

__all__ = ["declare_exclusive_queue", "queue_exists", "queue_has_arguments", "throwaway_channel"]


@contextlib.asynccontextmanager
async def throwaway_channel(
    conn: AbstractConnection, *, publisher_confirms: bool = False
) -> AsyncIterator[AbstractChannel]:
    """A channel for one operation, closed after it (if the broker has not already)."""
    channel = await conn.channel(publisher_confirms=publisher_confirms)
    try:
        yield channel
    finally:
        if not channel.is_closed:
            await channel.close()


async def queue_exists(conn: AbstractConnection, name: str) -> bool:
    """Whether queue ``name`` exists (a passive declare)."""
    async with throwaway_channel(conn) as channel:
        try:
            await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
    return True


async def queue_has_arguments(
    conn: AbstractConnection, name: str, arguments: Mapping[str, Any]
) -> bool | None:
    """True if queue ``name`` exists with ``arguments``, False if it exists with others,
    None if there is no such queue (declaring it is the only way AMQP tells)."""
    if not await queue_exists(conn, name):
        return None
    async with throwaway_channel(conn) as channel:
        try:
            await channel.declare_queue(name, durable=True, arguments=dict(arguments))
        except aiormq.exceptions.ChannelPreconditionFailed:
            return False
    return True


async def declare_exclusive_queue(
    channel: AbstractChannel, arguments: dict[str, Any] | None = None
) -> AbstractQueue:
    """A server-named, exclusive, auto-delete queue that aio-pika will *not* restore.

    aio-pika's robust channel declares such a queue again under its old name after a
    reconnect; on a cluster whose node died with it the broker refuses that
    (RESOURCE_LOCKED: the dead connection still holds it), which fails the whole
    connection's recovery. Its owner (a view, the RPC client) declares a new one instead."""
    if isinstance(channel, AbstractRobustChannel):
        return await channel.declare_queue(
            "", exclusive=True, auto_delete=True, arguments=arguments, robust=False
        )
    return await channel.declare_queue("", exclusive=True, auto_delete=True, arguments=arguments)
