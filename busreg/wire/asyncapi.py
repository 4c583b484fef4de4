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
from busreg.wire.asyncapi_channels import (
    AMQP_BINDING,
    build_channels,
    build_operations,
    build_parameters,
    ref_to,
)
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

#: Schema file -> component name.
_SCHEMA_NAMES = {
    "ingest-event.schema.json": "IngestEvent",
    "instance.schema.json": "Instance",
    "delta.schema.json": "Delta",
    "snapshot.schema.json": "Snapshot",
    "snapshot-request.schema.json": "SnapshotRequest",
    "dead-letter.schema.json": "DeadLetter",
}


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
        "payload": ref_to("components", "schemas", schema),
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
            f"A delta a consumer group failed on {c.DELIVERY_LIMIT + 1} times, as delivered.",
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
        "channels": build_channels(),
        "operations": build_operations(),
        "components": {
            "schemas": _schemas(),
            "messages": _messages(),
            "parameters": build_parameters(),
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
