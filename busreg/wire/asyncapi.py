"""The AsyncAPI 3.0 document of busreg's channels, generated from the wire contracts.

Channels (``{namespace}`` is ``BUSREG_NAMESPACE``, ``busreg`` by default):

* ``{namespace}.ingest-{partition}``: an ingest partition stream (RabbitMQ stream protocol,
  port 5552, or AMQP 0-9-1 through the super stream exchange ``{namespace}.ingest`` with
  routing key ``"{partition}"``); carries register, heartbeat, deregister and tick events;
* ``{namespace}.svc.{service}``: a service's delta exchange (topic; routing key = kind);
* ``{namespace}.group.{service}.{group}``: a consumer group's shared quorum queue;
* ``{namespace}.rpc``: snapshot and service-list requests, answered on ``reply_to``;
* ``{namespace}.deadletter``: refused ingest events and deltas a group gave up on.

Message payloads are the JSON Schemas of ``busreg.wire.schemas.build_schemas()`` (draft
2020-12, embedded as AsyncAPI multi-format schemas, their ``$ref``s made absolute in the
document). Regenerate after changing a contract
or the topology (a unit test compares the committed file)::

    python -m busreg.wire.asyncapi schemas/asyncapi.json
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from busreg import constants as c
from busreg.client.groups import DELIVERY_LIMIT, GROUP_QUEUE_MAX
from busreg.settings import Settings
from busreg.transport.topology import DEAD_LETTER_MAX, RPC_MESSAGE_TTL_MS
from busreg.wire.schemas import build_schemas, render

__all__ = [
    "ASYNCAPI_VERSION",
    "DEFAULT_PATH",
    "build_asyncapi",
    "embed_schema",
    "main",
    "write_asyncapi",
]

ASYNCAPI_VERSION = "3.0.0"
DEFAULT_PATH = "schemas/asyncapi.json"
SCHEMA_FORMAT = "application/schema+json;version=draft-2020-12"
AMQP_BINDING = "0.3.0"

# placeholders in channel addresses, rendered with the constants' own name builders so the
# document cannot drift from the names busreg really uses
_NS, _K, _SVC, _GROUP = "{namespace}", "{partition}", "{service}", "{group}"

#: Schema file -> component name.
_SCHEMA_NAMES = {
    "ingest-event.schema.json": "IngestEvent",
    "instance.schema.json": "Instance",
    "delta.schema.json": "Delta",
    "snapshot.schema.json": "Snapshot",
    "snapshot-request.schema.json": "SnapshotRequest",
    "dead-letter.schema.json": "DeadLetter",
}


def _ref(*path: str) -> dict[str, str]:
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
    return {name: _ref("components", "parameters", name) for name in names}


def embed_schema(schema: dict[str, Any], name: str) -> dict[str, Any]:
    """``schema`` as it sits in ``components.schemas.<name>.schema``: without ``$schema`` and
    ``$id`` (the multi-format ``schemaFormat`` names the dialect), and with its local
    references (``#/$defs/X``) made absolute in the document, because AsyncAPI tools
    resolve every ``$ref`` from the document root."""
    local = "#/$defs/"
    absolute = f"#/components/schemas/{name}/schema/$defs/"

    def rewrite(ref: str) -> str:
        return absolute + ref[len(local) :] if ref.startswith(local) else ref

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items() if k not in ("$schema", "$id")}
            if isinstance(out.get("$ref"), str):
                out["$ref"] = rewrite(out["$ref"])
            mapping = out.get("discriminator", {}).get("mapping")
            if isinstance(mapping, dict):  # OpenAPI-style discriminator: refs as well
                out["discriminator"]["mapping"] = {k: rewrite(v) for k, v in mapping.items()}
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    embedded: dict[str, Any] = walk(copy.deepcopy(schema))
    return embedded


def _schemas() -> dict[str, Any]:
    built = build_schemas()
    missing = set(built) ^ set(_SCHEMA_NAMES)
    if missing:
        raise RuntimeError(f"asyncapi: schema files and names disagree: {sorted(missing)}")
    out: dict[str, Any] = {
        _SCHEMA_NAMES[f]: {
            "schemaFormat": SCHEMA_FORMAT,
            "schema": embed_schema(s, _SCHEMA_NAMES[f]),
        }
        for f, s in built.items()
    }
    out["ServicesReply"] = {
        "schemaFormat": SCHEMA_FORMAT,
        "schema": {
            "title": "ServicesReply",
            "description": "Answer to a 'services' request: every known service.",
            "type": "object",
            "required": ["v", "services"],
            "properties": {
                "v": {"const": 1},
                "services": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["service", "epoch", "revision", "instances"],
                        "properties": {
                            "service": {"type": "string"},
                            "epoch": {"type": "string"},
                            "revision": {"type": "integer", "minimum": 0},
                            "instances": {"type": "integer", "minimum": 0},
                        },
                    },
                },
            },
        },
    }
    out["RequestError"] = {
        "schemaFormat": SCHEMA_FORMAT,
        "schema": {
            "title": "RequestError",
            "description": "A request the worker refused or could not answer.",
            "type": "object",
            "required": ["v", "error", "detail"],
            "properties": {
                "v": {"const": 1},
                "error": {"enum": ["invalid-request", "unavailable"]},
                "detail": {"type": "string"},
            },
        },
    }
    return out


def _message(name: str, schema: str, summary: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "title": name,
        "summary": summary,
        "contentType": "application/json",
        "payload": _ref("components", "schemas", schema),
        **extra,
    }


def _messages() -> dict[str, Any]:
    correlation = {
        "description": "AMQP correlation_id property: matches a reply to its request.",
        "location": "$message.header#/correlation_id",
    }
    return {
        "IngestEvent": _message(
            "IngestEvent",
            "IngestEvent",
            "Register, heartbeat, deregister (instances) or tick (the partition's owner).",
            description=(
                "Written to partition k = murmur3(service, seed 104729) mod P, RabbitMQ's own "
                "super stream routing. Over the stream protocol the body is this JSON (raw or "
                "as an AMQP 1.0 data section); over AMQP 0-9-1 the broker validates user_id."
            ),
        ),
        "Delta": _message(
            "Delta",
            "Delta",
            "One visible change of a service (added, modified, removed) at its next revision.",
            description=(
                "Published persistent with publisher confirms; routing key = kind. A "
                "subscriber that sees a revision gap or a new epoch re-reads a snapshot."
            ),
            bindings={"amqp": {"messageType": "delta", "bindingVersion": AMQP_BINDING}},
        ),
        "GroupDeadLetter": _message(
            "GroupDeadLetter",
            "Delta",
            f"A delta a consumer group failed on {DELIVERY_LIMIT + 1} times, as delivered.",
            headers={
                "type": "object",
                "properties": {
                    "x-death": {
                        "type": "array",
                        "description": "RabbitMQ's record: queue, reason 'delivery_limit', time.",
                    }
                },
            },
        ),
        "DeadLetter": _message(
            "DeadLetter",
            "DeadLetter",
            "An ingest event a worker refused, with the reason (routing key = reason).",
        ),
        "SnapshotRequest": _message(
            "SnapshotRequest",
            "SnapshotRequest",
            "Ask any worker for one service's snapshot, or for the list of services.",
            correlationId=correlation,
        ),
        "Snapshot": _message(
            "Snapshot",
            "Snapshot",
            "A service's whole instance set at one revision.",
            correlationId=correlation,
        ),
        "ServicesReply": _message(
            "ServicesReply",
            "ServicesReply",
            "Every known service with its revision and instance count.",
            correlationId=correlation,
        ),
        "RequestError": _message(
            "RequestError",
            "RequestError",
            "The request was invalid or no answer could be produced.",
            correlationId=correlation,
        ),
    }


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
        "servers": [_ref("servers", s) for s in servers],
        "messages": {m[0].lower() + m[1:]: _ref("components", "messages", m) for m in messages},
    }
    if parameters:
        channel["parameters"] = _parameters(*parameters)
    if bindings:
        channel["bindings"] = bindings
    if queue_arguments:
        channel["x-queue-arguments"] = queue_arguments
    return channel


def _channels() -> dict[str, Any]:
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
            f"{DELIVERY_LIMIT} redeliveries it is dead-lettered (reason delivery_limit).",
            ["Delta"],
            ["namespace", "service", "group"],
            _queue(c.group_queue(_NS, _SVC, _GROUP)),
            queue_arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": DELIVERY_LIMIT,
                "x-dead-letter-exchange": c.dead_letter_exchange(_NS),
                "x-max-length": GROUP_QUEUE_MAX,
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
            queue_arguments={"x-message-ttl": RPC_MESSAGE_TTL_MS},
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
            queue_arguments={"x-max-length": DEAD_LETTER_MAX, "x-overflow": "drop-head"},
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
        "channel": _ref("channels", channel),
        "summary": summary,
        "tags": [{"name": f"role:{role}"}],
        "messages": [_ref("channels", channel, "messages", m[0].lower() + m[1:]) for m in messages],
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


def _operations() -> dict[str, Any]:
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
                "channel": _ref("channels", "snapshotReplies"),
                "messages": [
                    _ref("channels", "snapshotReplies", "messages", m[0].lower() + m[1:])
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
                "channel": _ref("channels", "snapshotReplies"),
                "messages": [
                    _ref("channels", "snapshotReplies", "messages", m[0].lower() + m[1:])
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


def _parameter_objects() -> dict[str, Any]:
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


def build_asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document (a JSON-ready dict)."""
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:busreg:asyncapi:v1",
        "info": {
            "title": "busreg",
            "version": version("busreg"),
            "description": (
                "busreg's channels: instance events into the ingest super stream (RabbitMQ "
                "streams), per-service delta exchanges, consumer group queues, snapshot "
                "request/reply, and dead letters. Payloads are the JSON Schemas in schemas/. "
                f"Contract version {c.PROTOCOL_VERSION}."
            ),
            "license": {"name": "MIT"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "amqp": {
                "host": "{host}:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "pathname": "/",
                "description": "RabbitMQ (BUSREG_AMQP_URL); amqps on 5671.",
                "variables": {"host": {"default": "127.0.0.1"}},
            },
            "stream": {
                "host": "{host}:5552",
                "protocol": "rabbitmq-stream",
                "pathname": "/",
                "description": (
                    "RabbitMQ's stream protocol listener (rabbitmq_stream plugin; "
                    "BUSREG_STREAM_URL); TLS on 5551."
                ),
                "variables": {"host": {"default": "127.0.0.1"}},
            },
        },
        "channels": _channels(),
        "operations": _operations(),
        "components": {
            "schemas": _schemas(),
            "messages": _messages(),
            "parameters": _parameter_objects(),
        },
    }


def write_asyncapi(path: str | Path = DEFAULT_PATH) -> Path:
    """Write the document to ``path`` (formatted like the schema files)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(build_asyncapi()), encoding="utf-8")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m busreg.wire.asyncapi [PATH]``: regenerate the document (default
    ``schemas/asyncapi.json``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: python -m busreg.wire.asyncapi [PATH]   (default: {DEFAULT_PATH})"
    if args and args[0] in ("-h", "--help"):
        print(usage)
        return 0
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(usage, file=sys.stderr)
        return 2
    print(write_asyncapi(args[0] if args else DEFAULT_PATH))
    return 0


if __name__ == "__main__":
    sys.exit(main())
