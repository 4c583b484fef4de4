"""JSON Schemas of busreg's wire contracts, generated from the pydantic models.

The models in ``busreg.wire.models`` are the source of truth; the files in ``schemas/`` are
generated from them for users of other languages and are checked by a unit test against
what this module builds. Regenerate after changing a model::

    python -m busreg.wire.schemas schemas

Two kinds of contract, two rules:

* inbound (``ingest-event``, ``snapshot-request``): what a worker *accepts*. The pydantic
  validation schema, except that ``v`` and ``type`` are required in ingest events, because
  the decoder dead-letters an event without ``v`` (``unknown-version``) and picks the event
  class by ``type``.
* outbound (``instance``, ``delta``, ``snapshot``, ``dead-letter``): what busreg *writes*.
  The serialization schema with every property required (busreg always writes them all,
  but for ``override``, written only while set);
  extra properties are allowed, so consumers must ignore fields they do not know.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from busreg.constants import BATCH_PROTOCOL_VERSION, PROTOCOL_VERSION
from busreg.wire.models import Delta, Instance, Snapshot, SnapshotRequest, ingest_adapter

__all__ = [
    "DEAD_LETTER_REASONS",
    "JSON_SCHEMA_DIALECT",
    "DeadLetter",
    "build_schemas",
    "main",
    "render",
    "write_schemas",
]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

#: Reason codes a worker writes into dead letters today (``busreg.wire.codec``); the schema
#: leaves ``reason`` open so a newer worker's codes do not break older readers.
DEAD_LETTER_REASONS = (
    "oversized",
    "malformed",
    "unknown-version",
    "invalid",
    "wrong-partition",
    "unauthorised",
)

_ID_PREFIX = "urn:busreg:schema:v1:"

Mode = Literal["validation", "serialization"]


class DeadLetter(BaseModel):
    """An ingest message a worker could not apply, published to ``<ns>.deadletter``.

    The original message is kept (base64, first 64 KiB) with where it was read from, so an
    operator can see what sent it and replay it once fixed (invariant 6).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = 1
    reason: str = Field(
        pattern=r"^[a-z][a-z0-9-]{0,63}$",
        description="Stable reason code, e.g. " + ", ".join(DEAD_LETTER_REASONS) + ".",
    )
    detail: str = Field(max_length=500, description="Human-readable explanation.")
    stream: str = Field(description="Partition stream the message was read from.")
    partition: int = Field(ge=0)
    offset: int = Field(ge=0, description="Offset of the message in its stream.")
    size: int = Field(ge=0, description="Size of the original message in bytes.")
    body_b64: str = Field(
        pattern=r"^[A-Za-z0-9+/]*={0,2}$",
        description=(
            "Standard base64 of the original message's first 512 bytes; the whole message "
            "is in the retained stream at (stream, offset)."
        ),
    )


#: Outbound properties busreg writes only when they have a value (an instance's operator
#: override); every other outbound property is always written, so required.
WRITTEN_WHEN_SET = frozenset({"override"})


def _require(schema: dict[str, Any], names: Sequence[str]) -> None:
    """Add ``names`` to an object schema's ``required`` (keeping pydantic's order)."""
    required: list[str] = list(schema.get("required", []))
    for name in names:
        if name in schema.get("properties", {}) and name not in required:
            required.append(name)
    schema["required"] = required


def _objects(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The root schema (if it is an object) and every object schema in ``$defs``."""
    found = [schema] if "properties" in schema else []
    defs: dict[str, dict[str, Any]] = schema.get("$defs", {})
    found += [d for d in defs.values() if "properties" in d]
    return found


def _finish(
    schema: dict[str, Any], stem: str, title: str, description: str | None
) -> dict[str, Any]:
    out = {"$schema": JSON_SCHEMA_DIALECT, "$id": f"{_ID_PREFIX}{stem}", **schema}
    out["title"] = title
    if description:
        out["description"] = description
    return out


def _model_schema(model: type[BaseModel], mode: Mode) -> dict[str, Any]:
    schema = copy.deepcopy(model.model_json_schema(mode=mode))
    if mode == "serialization":
        for obj in _objects(schema):
            _require(obj, [name for name in obj["properties"] if name not in WRITTEN_WHEN_SET])
    return schema


def _ingest_schema() -> dict[str, Any]:
    schema = copy.deepcopy(ingest_adapter.json_schema(mode="validation"))
    for obj in _objects(schema):
        _require(obj, ["v", "type"])
    return schema


def build_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema (draft 2020-12) of every wire contract."""
    ingest_doc = (
        f"One message in an ingest partition stream (contract v{PROTOCOL_VERSION}): register, "
        "heartbeat, deregister, set-status, or a worker's watermark tick, selected by 'type'; "
        f"or (contract v{BATCH_PROTOCOL_VERSION}) heartbeats: several heartbeats of one "
        "partition in one message, each item a heartbeat event's JSON exactly as it would be "
        "sent alone (signed when auth is enforced). The stream message body is this JSON, "
        "either raw or as the data section of an AMQP 1.0 message."
    )
    contracts: list[tuple[str, str, dict[str, Any], str | None]] = [
        ("ingest-event", "IngestEvent", _ingest_schema(), ingest_doc),
        ("instance", "Instance", _model_schema(Instance, "serialization"), None),
        ("delta", "Delta", _model_schema(Delta, "serialization"), None),
        ("snapshot", "Snapshot", _model_schema(Snapshot, "serialization"), None),
        ("snapshot-request", "SnapshotRequest", _model_schema(SnapshotRequest, "validation"), None),
        ("dead-letter", "DeadLetter", _model_schema(DeadLetter, "serialization"), None),
    ]
    out: dict[str, dict[str, Any]] = {}
    for stem, title, schema, description in contracts:
        out[f"{stem}.schema.json"] = _finish(schema, stem, title, description)
    return out


def render(schema: dict[str, Any]) -> str:
    """The exact text of a schema file: 2-space indent, sorted keys, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schemas(directory: str | Path) -> list[Path]:
    """Write every schema into ``directory`` (created if missing); return the paths."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, schema in sorted(build_schemas().items()):
        path = target / name
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m busreg.wire.schemas [DIR]``: regenerate the schema files (in ``schemas``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m busreg.wire.schemas [DIR]   (default: schemas)"
    if args and args[0] in ("-h", "--help"):
        print(usage)
        return 0
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(usage, file=sys.stderr)
        return 2
    for path in write_schemas(args[0] if args else "schemas"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
