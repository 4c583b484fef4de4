"""Declaring and checking the broker topology of a namespace (idempotent).

* ``<ns>.ingest``: the ingest super stream, laid out as RabbitMQ's tooling does it: a direct
  exchange with ``x-super-stream: true`` and P streams ``<ns>.ingest-<k>`` bound with routing
  key ``"<k>"`` and ``x-stream-partition-order: k``; retention by size, small segments.
* ``<ns>.rpc``: the snapshot/list request queue all workers share (quorum).
* ``<ns>.deadletter``: fanout exchange and a bounded quorum queue for events that were
  refused. Both queues were classic before; ``apply`` migrates them (migration.py).
* ``<ns>.svc.<service>``: per-service delta exchanges, declared on first use.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from busreg import constants as c
from busreg.errors import BusregError, PartitionMismatch, TopologyMissing
from busreg.settings import Settings
from busreg.transport.connections import translate
from busreg.transport.migration import MIGRATING_SUFFIX, ensure_quorum_queue
from busreg.transport.queues import queue_exists

__all__ = [
    "apply_topology",
    "declare_ingest",
    "declare_service_exchange",
    "delete_topology",
    "group_queue_arguments",
    "ingest_stream_arguments",
    "partition_error",
    "service_user_permissions",
    "verify_partitions",
]

log = logging.getLogger("busreg.topology")


def group_queue_arguments(namespace: str) -> dict[str, Any]:
    """Arguments of a group queue (besides ``x-queue-type: quorum``); FastStream apps
    declaring the same queue must pass exactly these."""
    return {
        "x-delivery-limit": c.DELIVERY_LIMIT,
        "x-dead-letter-exchange": c.dead_letter_exchange(namespace),
        "x-max-length": c.GROUP_QUEUE_MAX,
        "x-overflow": "drop-head",
    }


def ingest_stream_arguments(settings: Settings) -> dict[str, Any]:
    """Arguments of a new ingest partition stream. On a cluster (more than one replica) the
    stream is replicated and its leader placed on the least loaded node."""
    args: dict[str, Any] = {
        "x-queue-type": "stream",
        "x-max-length-bytes": settings.stream_max_bytes,
        "x-stream-max-segment-size-bytes": settings.stream_segment_bytes,
    }
    replicas = settings.stream_replica_count()
    if replicas > 1:
        args["x-initial-cluster-size"] = replicas
        args["x-queue-leader-locator"] = "balanced"
    return args


async def declare_ingest(
    conn: AbstractConnection, channel: AbstractChannel, settings: Settings
) -> None:
    """The ingest super stream: exchange, P partition streams, and their bindings.

    A stream that exists is left as it is (RabbitMQ refuses a declare whose replica count
    or leader locator differ, so a namespace made on one node keeps working when its
    settings name a cluster; add replicas with ``rabbitmq-streams add_replica``)."""
    ns = settings.namespace
    exchange = await channel.declare_exchange(
        c.ingest_super_stream(ns),
        aio_pika.ExchangeType.DIRECT,
        durable=True,
        arguments={"x-super-stream": True},
    )
    for k in range(settings.partitions):
        name = c.ingest_partition(ns, k)
        if await queue_exists(conn, name):
            queue = await channel.declare_queue(name, passive=True)
        else:
            queue = await channel.declare_queue(
                name, durable=True, arguments=ingest_stream_arguments(settings)
            )
        await queue.bind(exchange, routing_key=str(k), arguments={"x-stream-partition-order": k})


async def apply_topology(conn: AbstractConnection, settings: Settings) -> None:
    """Declare everything of ``settings.namespace``; safe to run any number of times."""
    ns = settings.namespace
    await verify_partitions(conn, settings, allow_missing=True)
    with translate("topology apply"):
        channel = await conn.channel()
        try:
            await declare_ingest(conn, channel, settings)
            dlx = await channel.declare_exchange(
                c.dead_letter_exchange(ns), aio_pika.ExchangeType.FANOUT, durable=True
            )
        finally:
            await channel.close()
        # quorum queues, migrated from the classic ones of older namespaces (migration.py)
        await ensure_quorum_queue(conn, c.rpc_queue(ns), c.rpc_queue_arguments())
        await ensure_quorum_queue(conn, c.dead_letter_queue(ns), c.dead_letter_queue_arguments())
        channel = await conn.channel()
        try:
            dlq = await channel.declare_queue(
                c.dead_letter_queue(ns), durable=True, arguments=c.dead_letter_queue_arguments()
            )
            await dlq.bind(dlx)
        finally:
            await channel.close()
    log.info("topology applied namespace=%s partitions=%d", ns, settings.partitions)


async def verify_partitions(
    conn: AbstractConnection, settings: Settings, *, allow_missing: bool = False
) -> None:
    """Check that the super stream has exactly ``settings.partitions`` partitions.

    Workers and clients call this at start: a disagreement on P would silently misroute
    events, so it is an error instead. ``allow_missing`` accepts a namespace with no
    topology yet (before ``apply``).
    """
    ns, parts = settings.namespace, settings.partitions
    with translate("topology check"):
        first = await queue_exists(conn, c.ingest_partition(ns, 0))
        if not first:
            if allow_missing:
                return
            raise TopologyMissing(
                f"namespace {ns!r} has no ingest streams: run `busreg topology apply`"
            )
        if not await queue_exists(conn, c.ingest_partition(ns, parts - 1)) or await queue_exists(
            conn, c.ingest_partition(ns, parts)
        ):
            found = 0
            while await queue_exists(conn, c.ingest_partition(ns, found)):
                found += 1
            raise partition_error(ns, parts, found)


def partition_error(ns: str, parts: int, found: int) -> BusregError:
    """The error for a namespace with ``found`` ingest partitions where ``parts`` were
    expected (none: its topology is missing)."""
    if found == 0:
        return TopologyMissing(
            f"namespace {ns!r} has no ingest streams: run `busreg topology apply`"
        )
    return PartitionMismatch(
        f"namespace {ns!r} has {found} ingest partitions but settings say {parts} "
        f"(set BUSREG_PARTITIONS={found}; P is fixed when the topology is created)"
    )


async def declare_service_exchange(
    channel: AbstractChannel, ns: str, service: str
) -> AbstractExchange:
    with translate(f"declare exchange of {service}"):
        return await channel.declare_exchange(
            c.service_exchange(ns, service), aio_pika.ExchangeType.TOPIC, durable=True
        )


def service_user_permissions(namespace: str, service: str) -> tuple[str, str, str]:
    """(configure, write, read) regexes for a per-service broker user, least privilege:

    * write: publish events to the ingest exchange (AMQP path; identity = user_id), send
      snapshot requests (default exchange), bind its own queues, and name the dead-letter
      exchange in its group queues (RabbitMQ checks write access to it). No write on the ingest
      streams, so it cannot use the stream protocol (where a user_id could be forged);
    * read: the service exchanges it watches, and only its own queues: exclusive ones
      (``amq.gen-*`` or aio-pika's ``amq_<hex>``: watch and reply queues, which no other
      connection may use anyway) and its consumer groups, named
      ``<ns>.group.<watched service>.<own service>[-suffix]``;
    * configure: declare those queues and (idempotently) the service exchanges.
    """
    ns = re.escape(namespace)
    own_groups = rf"{ns}\.group\.[^.]+\.{re.escape(service)}(-[^.]*)?"
    exclusive = r"amq\.gen-.*|amq_[0-9a-f]+"
    configure = rf"^({exclusive}|{ns}\.svc\.[^.]+|{own_groups})$"
    write = rf"^({ns}\.ingest|{ns}\.deadletter|amq\.default|{exclusive}|{own_groups})$"
    read = rf"^({ns}\.svc\.[^.]+|{exclusive}|{own_groups})$"
    return configure, write, read


async def delete_topology(conn: AbstractConnection, settings: Settings) -> None:
    """Remove the namespace's streams, queues and exchanges (per-service ones it knows of
    are left to their owners; tests delete them by name)."""
    ns = settings.namespace
    with translate("topology delete"):
        channel = await conn.channel()
        try:
            for k in range(settings.partitions):
                await channel.queue_delete(c.ingest_partition(ns, k))
            await channel.exchange_delete(c.ingest_super_stream(ns))
            await channel.queue_delete(c.rpc_queue(ns))
            await channel.queue_delete(c.dead_letter_queue(ns))
            await channel.queue_delete(c.rpc_queue(ns) + MIGRATING_SUFFIX)
            await channel.queue_delete(c.dead_letter_queue(ns) + MIGRATING_SUFFIX)
            await channel.exchange_delete(c.dead_letter_exchange(ns))
        finally:
            await channel.close()
