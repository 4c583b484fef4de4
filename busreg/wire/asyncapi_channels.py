"""The channel, operation and parameter objects of the AsyncAPI document (``asyncapi``).

Addresses are rendered with ``busreg.constants``' own name builders and queue arguments are
its constants, so this part of the document cannot drift from what busreg declares. Messages
and schemas (``#/components/...``) are ``busreg.wire.asyncapi``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from busreg import constants as c
from busreg.settings import Settings

__all__ = ["AMQP_BINDING", "build_channels", "build_operations", "build_parameters", "ref_to"]

AMQP_BINDING = "0.3.0"

# placeholders in channel addresses, rendered with the constants' own name builders so the
# document cannot drift from the names busreg really uses
_NS, _K, _SVC, _GROUP = "{namespace}", "{partition}", "{service}", "{group}"


def ref_to(*path: str) -> dict[str, str]:
    """A JSON Reference to ``#/<path>`` in the document (segments escaped per RFC 6901)."""
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path)}


def _exchange(name: str, kind: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {
                "name": name,
                "type": kind,
                "durable": True,
                "autoDelete": False,
                "vhost": "/",
            },
            "bindingVersion": AMQP_BINDING,
        }
    }


def _queue(name: str, *, exclusive: bool = False) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "queue",
            "queue": {
                "name": name,
                "durable": not exclusive,
                "exclusive": exclusive,
                "autoDelete": exclusive,
                "vhost": "/",
            },
            "bindingVersion": AMQP_BINDING,
        }
    }


def _parameters(*names: str) -> dict[str, Any]:
    return {name: ref_to("components", "parameters", name) for name in names}


def _channel(
    address: str | None,
    description: str,
    messages: Sequence[str],
    parameters: Sequence[str],
    bindings: dict[str, Any] | None,
    *,
    servers: Sequence[str] = ("amqp",),
    queue_arguments: dict[str, Any] | None = None,
) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "address": address,
        "description": description,
        "servers": [ref_to("servers", s) for s in servers],
        "messages": {m[0].lower() + m[1:]: ref_to("components", "messages", m) for m in messages},
    }
    if parameters:
        channel["parameters"] = _parameters(*parameters)
    if bindings:
        channel["bindings"] = bindings
    if queue_arguments:
        channel["x-queue-arguments"] = queue_arguments
    return channel


def build_channels() -> dict[str, Any]:
    ingest = f"{c.ingest_super_stream(_NS)}-{_K}"  # c.ingest_partition, with a placeholder
    stream_defaults = Settings.model_fields
    return {
        "ingestPartition": _channel(
            ingest,
            "One partition of the ingest super stream (a RabbitMQ stream): the retained, "
            "replayable log of instance events. Written over the stream protocol (rstream, "
            "publisher confirms) or AMQP 0-9-1; read only by the worker owning the partition. "
            "Retention and segment size are settings (defaults shown).",
            ["IngestEvent"],
            ["namespace", "partition"],
            _queue(ingest),
            servers=("stream", "amqp"),
            queue_arguments={
                "x-queue-type": "stream",
                "x-max-length-bytes": stream_defaults["stream_max_bytes"].default,
                "x-stream-max-segment-size-bytes": stream_defaults["stream_segment_bytes"].default,
            },
        ),
        "ingestSuperStream": _channel(
            c.ingest_super_stream(_NS),
            "The super stream exchange (direct, x-super-stream: true) for AMQP 0-9-1 "
            'publishers: routing key "<k>" reaches partition stream <namespace>.ingest-<k>.',
            ["IngestEvent"],
            ["namespace"],
            _exchange(c.ingest_super_stream(_NS), "direct"),
        ),
        "serviceDeltas": _channel(
            c.service_exchange(_NS, _SVC),
            "A service's delta exchange (topic, durable): only that service's changes, so a "
            "subscriber binds just the services it calls. Routing key: added, modified or "
            "removed. Watchers bind an exclusive queue with '#'.",
            ["Delta"],
            ["namespace", "service"],
            _exchange(c.service_exchange(_NS, _SVC), "topic"),
        ),
        "consumerGroup": _channel(
            c.group_queue(_NS, _SVC, _GROUP),
            "A consumer group's shared queue (quorum, durable, bound to the service's "
            "exchange with '#'): each delta goes to one member, which acks it manually; after "
            f"{c.DELIVERY_LIMIT} redeliveries it is dead-lettered (reason delivery_limit).",
            ["Delta"],
            ["namespace", "service", "group"],
            _queue(c.group_queue(_NS, _SVC, _GROUP)),
            queue_arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": c.DELIVERY_LIMIT,
                "x-dead-letter-exchange": c.dead_letter_exchange(_NS),
                "x-max-length": c.GROUP_QUEUE_MAX,
                "x-overflow": "drop-head",
            },
        ),
        "snapshotRequests": _channel(
            c.rpc_queue(_NS),
            "Requests to the workers (competing consumers; any worker answers). The reply "
            "goes to the request's reply_to queue with its correlation_id.",
            ["SnapshotRequest"],
            ["namespace"],
            _queue(c.rpc_queue(_NS)),
            queue_arguments=c.rpc_queue_arguments(),
        ),
        "snapshotReplies": _channel(
            None,
            "The requester's exclusive reply queue, named in the request's reply_to.",
            ["Snapshot", "ServicesReply", "RequestError"],
            [],
            None,
        ),
        "deadLetters": _channel(
            c.dead_letter_exchange(_NS),
            "Fanout exchange of everything refused: ingest events a worker could not apply "
            "(with the reason) and deltas a consumer group gave up on.",
            ["DeadLetter", "GroupDeadLetter"],
            ["namespace"],
            _exchange(c.dead_letter_exchange(_NS), "fanout"),
        ),
        "deadLetterQueue": _channel(
            c.dead_letter_queue(_NS),
            "Durable, bounded queue bound to the dead-letter exchange, read by operators.",
            ["DeadLetter", "GroupDeadLetter"],
            ["namespace"],
            _queue(c.dead_letter_queue(_NS)),
            queue_arguments=c.dead_letter_queue_arguments(),
        ),
    }


def _op(
    action: str,
    channel: str,
    messages: Sequence[str],
    summary: str,
    role: str,
    *,
    ack: bool | None = None,
    persistent: bool = False,
    reply: dict[str, Any] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "action": action,
        "channel": ref_to("channels", channel),
        "summary": summary,
        "tags": [{"name": f"role:{role}"}],
        "messages": [
            ref_to("channels", channel, "messages", m[0].lower() + m[1:]) for m in messages
        ],
    }
    amqp: dict[str, Any] = {}
    if ack is not None:
        amqp["ack"] = ack
    if persistent:
        amqp["deliveryMode"] = 2
    if amqp:
        op["bindings"] = {"amqp": {**amqp, "bindingVersion": AMQP_BINDING}}
    if reply is not None:
        op["reply"] = reply
    return op


def build_operations() -> dict[str, Any]:
    reply_messages = ["Snapshot", "ServicesReply", "RequestError"]
    return {
        "publishIngestEvent": _op(
            "send",
            "ingestPartition",
            ["IngestEvent"],
            "Register, heartbeat (every interval, carrying the whole registration) and "
            "deregister an instance; each returns once the broker confirmed it.",
            "instance",
        ),
        "publishIngestEventOverAmqp": _op(
            "send",
            "ingestSuperStream",
            ["IngestEvent"],
            "The same events from an AMQP 0-9-1 client (any language): set user_id.",
            "instance",
            persistent=True,
        ),
        "consumeIngestPartition": _op(
            "receive",
            "ingestPartition",
            ["IngestEvent"],
            "The partition's owner applies events atomically with its offset (Redis).",
            "worker",
        ),
        "publishDelta": _op(
            "send",
            "serviceDeltas",
            ["Delta"],
            "The owner drains its outbox to the service exchanges, with publisher confirms.",
            "worker",
            persistent=True,
        ),
        "watchService": _op(
            "receive",
            "serviceDeltas",
            ["Delta"],
            "A live view: snapshot, then deltas on an exclusive, bounded queue.",
            "subscriber",
            ack=False,
        ),
        "consumeGroup": _op(
            "receive",
            "consumerGroup",
            ["Delta"],
            "A group member: each delta once per group, acked after its effect is durable.",
            "subscriber",
            ack=True,
        ),
        "requestSnapshot": _op(
            "send",
            "snapshotRequests",
            ["SnapshotRequest"],
            "Read a service's snapshot (or the service list); resent each second until answered.",
            "subscriber",
            reply={
                "address": {
                    "description": "The requester's exclusive queue.",
                    "location": "$message.header#/reply_to",
                },
                "channel": ref_to("channels", "snapshotReplies"),
                "messages": [
                    ref_to("channels", "snapshotReplies", "messages", m[0].lower() + m[1:])
                    for m in reply_messages
                ],
            },
        ),
        "answerSnapshot": _op(
            "receive",
            "snapshotRequests",
            ["SnapshotRequest"],
            "Any worker answers from Redis.",
            "worker",
            ack=True,
            reply={
                "address": {"location": "$message.header#/reply_to"},
                "channel": ref_to("channels", "snapshotReplies"),
                "messages": [
                    ref_to("channels", "snapshotReplies", "messages", m[0].lower() + m[1:])
                    for m in reply_messages
                ],
            },
        ),
        "publishDeadLetter": _op(
            "send",
            "deadLetters",
            ["DeadLetter", "GroupDeadLetter"],
            "Workers dead-letter refused events; the broker dead-letters group deltas.",
            "worker",
        ),
        "readDeadLetters": _op(
            "receive",
            "deadLetterQueue",
            ["DeadLetter", "GroupDeadLetter"],
            "Operators inspect (and replay) what was refused.",
            "operator",
        ),
    }


def build_parameters() -> dict[str, Any]:
    return {
        "namespace": {
            "description": "The busreg namespace (BUSREG_NAMESPACE): prefix of every name.",
            "default": "busreg",
            "examples": ["busreg", "prod"],
        },
        "partition": {
            "description": "Partition number k, 0 <= k < P (BUSREG_PARTITIONS, default 8).",
            "examples": ["0", "7"],
        },
        "service": {
            "description": "A service name: letters, digits, '.', '_', '-'.",
            "examples": ["inventory"],
        },
        "group": {
            "description": "A consumer group's name, chosen by its members.",
            "examples": ["billing"],
        },
    }
