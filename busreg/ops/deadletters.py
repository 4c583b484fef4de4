"""Reading the dead-letter queue ``<ns>.deadletter`` (``busreg deadletters``).

Two kinds of records arrive there:

* ingest events a worker refused: a JSON record with ``reason`` (``malformed``,
  ``oversized``, ``unknown-version``, ``invalid``, ``wrong-partition``, ``unauthorised``),
  ``detail``, ``stream``, ``partition``, ``offset``, ``size`` and the original bytes in
  ``body_b64`` (see schemas/dead-letter.schema.json);
* deltas a consumer group could not process within its delivery limit (RabbitMQ dead-letters
  them with an ``x-death`` / ``x-first-death-reason`` header); shown with reason
  ``delivery-limit`` and the delta as body.

Reading is non-destructive unless ``ack=True``: messages are consumed without acking and
the channel is closed, which puts them back in order.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage

from busreg import constants as c
from busreg.settings import Settings
from busreg.transport.connections import connect_amqp, translate

__all__ = ["read_dead_letters"]


def describe(message: AbstractIncomingMessage) -> dict[str, Any]:
    """One dead letter as a flat dict an operator (or a script) can read."""
    try:
        record = orjson.loads(message.body)
    except orjson.JSONDecodeError:
        record = None
    if isinstance(record, dict) and "reason" in record and "body_b64" in record:
        raw = base64.b64decode(record["body_b64"])
        return {
            "kind": "ingest-event",
            "reason": record["reason"],
            "detail": record.get("detail", ""),
            "stream": record.get("stream"),
            "partition": record.get("partition"),
            "offset": record.get("offset"),
            "size": record.get("size"),
            "body": raw[:200].decode("utf-8", "replace"),
        }
    headers = dict(message.headers or {})
    reason = headers.get("x-first-death-reason", "delivery-limit")
    queue = headers.get("x-first-death-queue")
    return {
        "kind": "delta",
        "reason": reason.decode() if isinstance(reason, bytes) else str(reason),
        "queue": queue.decode() if isinstance(queue, bytes) else queue,
        "body": message.body[:200].decode("utf-8", "replace"),
    }


async def read_dead_letters(
    settings: Settings, *, limit: int = 20, ack: bool = False, wait: float = 0.5
) -> tuple[int, list[dict[str, Any]]]:
    """(messages in the queue, the oldest ``limit`` described)."""
    conn = await connect_amqp(settings, "busreg-deadletters")
    try:
        with translate("read dead letters"):
            channel = await conn.channel()
            await channel.set_qos(prefetch_count=max(1, limit))
            queue = await channel.declare_queue(
                c.dead_letter_queue(settings.namespace), passive=True
            )
            total = queue.declaration_result.message_count or 0
            got: list[dict[str, Any]] = []
            # the declare-ok count may trail messages the broker has just confirmed, so it is
            # only a hint: read until the limit, or until the queue stays idle
            if limit:
                async with queue.iterator() as it:
                    while len(got) < limit:
                        try:
                            async with asyncio.timeout(wait):  # idle timeout
                                message = await anext(it)
                        except (TimeoutError, StopAsyncIteration):
                            break
                        got.append(describe(message))
                        if ack:
                            await message.ack()
            await channel.close()  # unacked ones go back to the queue, in order
    finally:
        await conn.close()
    return max(total, len(got)), got
