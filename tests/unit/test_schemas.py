"""The JSON Schemas in ``schemas/`` match the models, and busreg's own output matches them."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from busreg import constants as c
from busreg.errors import InvalidEvent
from busreg.wire.codec import decode_ingest, encode_event, encode_instance
from busreg.wire.models import Delta, Instance, InstanceStatus, Snapshot, SnapshotRequest, Tick
from busreg.wire.schemas import DeadLetter, build_schemas, main, render, write_schemas

from . import examples as ex

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
REGENERATE = "regenerate with: python -m busreg.wire.schemas schemas"

EXPECTED_FILES = {
    "ingest-event.schema.json",
    "instance.schema.json",
    "delta.schema.json",
    "snapshot.schema.json",
    "snapshot-request.schema.json",
    "dead-letter.schema.json",
}


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict[str, Any]]:
    return build_schemas()


def validator(schemas: dict[str, dict[str, Any]], name: str) -> Draft202012Validator:
    return Draft202012Validator(schemas[name])


def errors_of(v: Draft202012Validator, document: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(document)]


# --- the committed files ------------------------------------------------------------------------


def test_committed_schema_files_are_up_to_date(schemas: dict[str, dict[str, Any]]) -> None:
    assert set(schemas) == EXPECTED_FILES
    committed = {p.name for p in SCHEMA_DIR.glob("*.schema.json")}
    assert committed == set(schemas), f"schemas/ has {sorted(committed)}; {REGENERATE}"
    for name, schema in schemas.items():
        text = (SCHEMA_DIR / name).read_text(encoding="utf-8")
        assert json.loads(text) == schema, f"schemas/{name} differs from the models; {REGENERATE}"
        assert text == render(schema), f"schemas/{name} is not formatted as generated; {REGENERATE}"


@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_schema_is_valid_draft_2020_12(schemas: dict[str, dict[str, Any]], name: str) -> None:
    schema = schemas[name]
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].startswith("urn:busreg:schema:v1:")
    assert schema["title"]


def test_ids_are_unique(schemas: dict[str, dict[str, Any]]) -> None:
    ids = [s["$id"] for s in schemas.values()]
    assert len(set(ids)) == len(ids)


def test_write_schemas_and_main(tmp_path: Path) -> None:
    written = write_schemas(tmp_path / "out")
    assert {p.name for p in written} == EXPECTED_FILES
    for path in written:
        text = path.read_text(encoding="utf-8")
        assert text.endswith("}\n")
        assert not text.endswith("\n\n")
        assert text.startswith('{\n  "$defs"') or text.startswith('{\n  "$id"')
        assert text == render(json.loads(text))  # sorted keys, 2-space indent
    assert main([str(tmp_path / "cli")]) == 0
    for path in written:
        assert (tmp_path / "cli" / path.name).read_bytes() == path.read_bytes()
    assert main(["a", "b"]) == 2


# --- ingest events ----------------------------------------------------------------------------


@pytest.mark.parametrize("event", ex.ALL_EVENTS, ids=lambda e: type(e).__name__)
def test_encoded_events_validate(schemas: dict[str, dict[str, Any]], event: Any) -> None:
    v = validator(schemas, "ingest-event.schema.json")
    assert errors_of(v, orjson.loads(encode_event(event))) == []


def test_tick_as_the_partition_writes_it_validates(schemas: dict[str, dict[str, Any]]) -> None:
    v = validator(schemas, "ingest-event.schema.json")
    body = orjson.dumps(Tick(worker="worker-host-1234").model_dump())  # as PartitionRunner does
    assert errors_of(v, orjson.loads(body)) == []


def _register_json(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(encode_event(ex.register()))
    data.update(changes)
    return {k: v for k, v in data.items() if v is not ...}


@pytest.mark.parametrize(
    "document",
    [
        _register_json(v=...),
        _register_json(type=...),
        _register_json(v=2),
        _register_json(type="explode"),
        _register_json(service="bad name!"),
        _register_json(seq=-1),
        _register_json(incarnation=[1]),
        _register_json(address="10.0.0.7"),
        _register_json(ttl=121),  # over MAX_TTL (120 s)
        _register_json(metadata={"k": 1}),
        _register_json(extra="field"),
        {"v": 1, "type": "tick"},
        {"v": 1, "type": "deregister", "service": "a", "instance_id": "b", "incarnation": 1},
    ],
)
def test_schema_and_decoder_both_reject(
    schemas: dict[str, dict[str, Any]], document: dict[str, Any]
) -> None:
    assert errors_of(validator(schemas, "ingest-event.schema.json"), document) != []
    with pytest.raises(InvalidEvent):
        decode_ingest(orjson.dumps(document))


@pytest.mark.parametrize("change", [{"incarnation": "1"}, {"seq": "2"}, {"ttl": "3"}])
def test_decoder_is_as_strict_as_the_schema(
    schemas: dict[str, dict[str, Any]], change: dict[str, Any]
) -> None:
    document = _register_json(**change)
    assert errors_of(validator(schemas, "ingest-event.schema.json"), document) != []
    with pytest.raises(InvalidEvent):
        decode_ingest(orjson.dumps(document))


def test_schema_accepts_what_the_decoder_accepts_with_defaults(
    schemas: dict[str, dict[str, Any]],
) -> None:
    minimal = {
        "v": 1,
        "type": "heartbeat",
        "service": "inventory",
        "instance_id": "inv-1",
        "incarnation": 1,
        "seq": 1,
        "address": "[::1]:8080",
    }
    assert errors_of(validator(schemas, "ingest-event.schema.json"), minimal) == []
    assert decode_ingest(orjson.dumps(minimal)).event.type == "heartbeat"


# --- what workers publish ----------------------------------------------------------------------


def lua_delta_body(kind: str, inst: Instance, reason: str | None, revision: int = 3) -> str:
    """The delta body exactly as busreg/lua/apply.lua concatenates it (announce())."""
    return (
        '{"v":1,"kind":"' + kind + '","service":"' + inst.service + '","epoch":"' + "ab12"
        + '","revision":' + str(revision) + ',"instance":' + encode_instance(inst)
        + ',"reason":' + (f'"{reason}"' if reason else "null") + "}"
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("added", None), ("modified", None), ("removed", "deregistered"), ("removed", "expired")],
)
def test_lua_delta_body_validates(
    schemas: dict[str, dict[str, Any]], kind: str, reason: str | None
) -> None:
    inst = ex.instance(address="[::1]:8080", metadata={}, status=InstanceStatus.DOWN)
    body = lua_delta_body(kind, inst, reason)
    document = json.loads(body)
    assert errors_of(validator(schemas, "delta.schema.json"), document) == []
    delta = Delta.model_validate_json(body)  # and the subscriber side reads it back
    assert (delta.kind, delta.revision, delta.instance, delta.reason) == (kind, 3, inst, reason)


def test_example_delta_from_the_brief_validates(schemas: dict[str, dict[str, Any]]) -> None:
    body = lua_delta_body("added", ex.instance(), None)
    assert json.loads(body)["epoch"] == "ab12"
    assert errors_of(validator(schemas, "delta.schema.json"), json.loads(body)) == []
    bad = json.loads(body) | {"revision": 0}
    assert errors_of(validator(schemas, "delta.schema.json"), bad) != []


def test_instance_json_validates(schemas: dict[str, dict[str, Any]]) -> None:
    v = validator(schemas, "instance.schema.json")
    for event in ex.ALL_EVENTS:
        if hasattr(event, "instance"):
            assert errors_of(v, json.loads(encode_instance(event.instance()))) == []
    incomplete = json.loads(encode_instance(ex.instance()))
    del incomplete["zone"]  # busreg always writes every field
    assert errors_of(v, incomplete) != []


def test_snapshot_reply_validates(schemas: dict[str, dict[str, Any]]) -> None:
    snap = Snapshot(
        service="inventory",
        epoch="ab12",
        revision=7,
        instances=[ex.instance("a"), ex.instance("b", address="[::1]:1")],
    )
    v = validator(schemas, "snapshot.schema.json")
    assert errors_of(v, snap.model_dump(mode="json")) == []  # as the worker replies
    empty = Snapshot(service="inventory", epoch="", revision=0, instances=[])
    assert errors_of(v, empty.model_dump(mode="json")) == []


@pytest.mark.parametrize(
    ("document", "ok"),
    [
        (SnapshotRequest(service="inventory").model_dump(mode="json"), True),
        (SnapshotRequest(op="services").model_dump(mode="json"), True),
        ({"op": "snapshot", "service": "inventory"}, True),
        ({"op": "drop"}, False),
        ({"op": "snapshot", "service": "bad name"}, False),
        ({"op": "snapshot", "extra": 1}, False),
    ],
)
def test_snapshot_request(schemas: dict[str, dict[str, Any]], document: Any, ok: bool) -> None:
    assert (errors_of(validator(schemas, "snapshot-request.schema.json"), document) == []) is ok


def test_dead_letter_as_the_partition_writes_it(schemas: dict[str, dict[str, Any]]) -> None:
    from busreg.server.encoding import BatchEncoder
    from busreg.server.stats import PartitionStats
    from busreg.settings import Settings

    encoder = BatchEncoder(Settings(namespace="busreg"), 3, PartitionStats())
    body = b"\x00garbage\xff" * 10
    entry = encoder._dead_letter("malformed", "x" * 900, 42, body)
    exchange, reason, record = entry.split(c.FIELD_SEPARATOR, 2)
    assert (exchange, reason) == (c.dead_letter_exchange("busreg"), "malformed")
    document = json.loads(record)
    assert errors_of(validator(schemas, "dead-letter.schema.json"), document) == []
    letter = DeadLetter.model_validate(document)
    assert (letter.partition, letter.offset, letter.size) == (3, 42, len(body))
    assert base64.b64decode(letter.body_b64) == body
    assert letter.stream == "busreg.ingest-3"
    assert len(letter.detail) == 500
