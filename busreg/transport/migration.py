"""Moving a namespace's shared queues from classic to quorum, keeping their messages.

Namespaces created before busreg declared ``<ns>.rpc`` and ``<ns>.deadletter`` as quorum
queues have classic ones, which live on one node. A queue's type cannot change in place
(a declare with other arguments is refused with 406 PRECONDITION_FAILED), so
``busreg topology apply`` rebuilds each such queue:

1. move its messages into ``<name>.migrating`` (a quorum queue),
2. delete it and declare it again as a quorum queue,
3. move the messages back and delete ``<name>.migrating``.

Every step is safe to run again: a run that stopped half-way (the process died, the broker
went away) leaves either the old queue or the ``.migrating`` one with the messages, and the
next ``topology apply`` finds it and finishes. A message is acked on its source queue only
after the broker confirmed its copy, so none is lost; a crash between the two copies it
twice (at least once: dead letters are records for operators, a duplicate is harmless).

Consumers of the rebuilt queue (workers on ``<ns>.rpc``) get a broker-side cancel when it is
deleted; aio-pika's robust channel re-subscribes them to the new queue. Requests in flight
during the swap are answered late or not at all: clients retry them (``request_timeout``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection

from busreg.transport.queues import queue_has_arguments, throwaway_channel

__all__ = ["MIGRATING_SUFFIX", "ensure_quorum_queue"]

log = logging.getLogger("busreg.topology")

MIGRATING_SUFFIX = ".migrating"


async def _move(conn: AbstractConnection, source: str, target: str) -> int:
    """Move every message of ``source`` to ``target`` (confirmed, then acked); returns how
    many. Headers, properties and body are kept."""
    moved = 0
    async with throwaway_channel(conn, publisher_confirms=True) as channel:
        queue = await channel.declare_queue(source, passive=True)
        while True:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                return moved
            copy = aio_pika.Message(
                message.body,
                headers=message.headers,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                correlation_id=message.correlation_id,
                reply_to=message.reply_to,
                expiration=message.expiration,
                message_id=message.message_id,
                timestamp=message.timestamp,
                type=message.type,
                user_id=message.user_id,
                app_id=message.app_id,
            )
            await channel.default_exchange.publish(copy, routing_key=target)
            await message.ack()
            moved += 1
    raise AssertionError("unreachable")  # the loop returns


async def _declare(conn: AbstractConnection, name: str, arguments: Mapping[str, Any]) -> None:
    async with throwaway_channel(conn) as channel:
        await channel.declare_queue(name, durable=True, arguments=dict(arguments))


async def _delete(conn: AbstractConnection, name: str) -> None:
    async with throwaway_channel(conn) as channel:
        await channel.queue_delete(name)


async def ensure_quorum_queue(
    conn: AbstractConnection, name: str, arguments: Mapping[str, Any]
) -> None:
    """Make ``name`` a durable queue with ``arguments`` (which name a quorum type),
    migrating a classic queue of that name with its messages (see the module docstring).
    Errors are aio-pika's: the caller maps them."""
    temp = name + MIGRATING_SUFFIX
    temp_args = {"x-queue-type": "quorum"}
    state = await queue_has_arguments(conn, name, arguments)
    if state is True and await queue_has_arguments(conn, temp, temp_args) is None:
        return  # the common case: already there, nothing half-done
    if state is False:
        log.warning(
            "queue %s has other arguments than %s (a classic queue from an older busreg): "
            "rebuilding it as a quorum queue, messages kept",
            name,
            dict(arguments),
        )
        await _declare(conn, temp, temp_args)
        moved = await _move(conn, name, temp)
        await _delete(conn, name)
        log.info("queue %s: %d messages set aside in %s", name, moved, temp)
        state = None
    if state is None:
        await _declare(conn, name, arguments)
    if await queue_has_arguments(conn, temp, temp_args) is not None:
        moved = await _move(conn, temp, name)
        await _delete(conn, temp)
        log.info("queue %s is a quorum queue now; %d messages moved back", name, moved)
