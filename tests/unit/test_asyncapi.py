"""The AsyncAPI document in schemas/asyncapi.json: current, self-consistent, true to busreg."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from busreg import constants as c
from busreg.transport.topology import group_queue_arguments
from busreg.wire.asyncapi import (
    ASYNCAPI_VERSION,
    build_asyncapi,
    embed_schema,
    main,
    write_asyncapi,
)
from busreg.wire.codec import encode_event
from busreg.wire.models import Delta, DeltaKind, Snapshot, SnapshotRequest
from busreg.wire.schemas import DeadLetter, build_schemas, render

from . import examples as ex

BASE = "urn:busreg:asyncapi-under-test"
COMMITTED = Path(__file__).resolve().parents[2] / "schemas" / "asyncapi.json"
REGENERATE = "regenerate with: python -m busreg.wire.asyncapi schemas/asyncapi.json"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return build_asyncapi()


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def payload_validator(doc: dict[str, Any], message: str) -> Draft202012Validator:
    """A validator of a message's payload, resolving ``$ref``s from the document root as
    AsyncAPI tools do."""
    payload = doc["components"]["messages"][message]["payload"]
    registry: Registry[Any] = Registry().with_resource(BASE, DRAFT202012.create_resource(doc))
    return Draft202012Validator({"$ref": f"{BASE}{payload['$ref']}/schema"}, registry=registry)


def test_committed_document_is_current(doc: dict[str, Any]) -> None:
    assert COMMITTED.exists(), f"schemas/asyncapi.json is missing; {REGENERATE}"
    text = COMMITTED.read_text(encoding="utf-8")
    assert json.loads(text) == doc, f"schemas/asyncapi.json is out of date; {REGENERATE}"
    assert text == render(doc), f"schemas/asyncapi.json is not formatted as generated; {REGENERATE}"


def test_main_writes_the_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out" / "asyncapi.json"
    assert main([str(target)]) == 0
    assert json.loads(target.read_text()) == build_asyncapi()
    assert main(["--help"]) == 0
    assert main(["a", "b"]) == 2
    assert "usage" in capsys.readouterr().err
    assert write_asyncapi(tmp_path / "again.json").read_text() == target.read_text()


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    found = refs(doc)
    assert len(found) > 40
    for ref in found:
        resolve(doc, ref)  # from the root, as AsyncAPI tools resolve them
    text = json.dumps(doc)
    assert '"#/$defs/' not in text, "no reference relative to an embedded schema is left"
    assert '"$id"' not in text
    assert '"$schema"' not in text


def test_operations_use_their_channels_messages(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == ASYNCAPI_VERSION == "3.0.0"
    for name, op in doc["operations"].items():
        assert op["action"] in ("send", "receive"), name
        channel_ref = op["channel"]["$ref"]
        prefix = channel_ref + "/messages/"
        for message in op["messages"]:
            assert message["$ref"].startswith(prefix), (name, message)
        if "reply" in op:
            reply_prefix = op["reply"]["channel"]["$ref"] + "/messages/"
            assert all(m["$ref"].startswith(reply_prefix) for m in op["reply"]["messages"])
    used = {op["channel"]["$ref"] for op in doc["operations"].values()}
    used |= {op["reply"]["channel"]["$ref"] for op in doc["operations"].values() if "reply" in op}
    assert used == {f"#/channels/{ch}" for ch in doc["channels"]}, "no orphan channel"


def test_channel_parameters_match_their_addresses(doc: dict[str, Any]) -> None:
    for name, channel in doc["channels"].items():
        placeholders = set(re.findall(r"\{(\w+)\}", channel["address"] or ""))
        assert placeholders == set(channel.get("parameters", {})), name
        for param in channel.get("parameters", {}).values():
            resolve(doc, param["$ref"])


def test_addresses_are_the_names_busreg_uses(doc: dict[str, Any]) -> None:
    values = {"namespace": "prod", "service": "inventory", "group": "billing", "partition": "3"}

    def address(channel: str) -> str:
        raw: str = doc["channels"][channel]["address"]
        return raw.format(**values)

    assert address("ingestPartition") == c.ingest_partition("prod", 3)
    assert address("ingestSuperStream") == c.ingest_super_stream("prod")
    assert address("serviceDeltas") == c.service_exchange("prod", "inventory")
    assert address("consumerGroup") == c.group_queue("prod", "inventory", "billing")
    assert address("snapshotRequests") == c.rpc_queue("prod")
    assert address("deadLetters") == c.dead_letter_exchange("prod")
    assert address("deadLetterQueue") == c.dead_letter_queue("prod")
    assert doc["channels"]["snapshotReplies"]["address"] is None  # reply_to, per request
    group_args = doc["channels"]["consumerGroup"]["x-queue-arguments"]
    expected = {"x-queue-type": "quorum", **group_queue_arguments("{namespace}")}
    assert group_args == expected


def test_payloads_are_the_committed_json_schemas(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    names = {
        "ingest-event": "IngestEvent",
        "instance": "Instance",
        "delta": "Delta",
        "snapshot": "Snapshot",
        "snapshot-request": "SnapshotRequest",
        "dead-letter": "DeadLetter",
    }
    for file, schema in build_schemas().items():
        name = names[file.removesuffix(".schema.json")]
        assert schemas[name]["schema"] == embed_schema(schema, name), name
        assert schemas[name]["schemaFormat"] == "application/schema+json;version=draft-2020-12"
        assert schemas[name]["schema"]["title"] == schema["title"]
    for wrapped in schemas.values():
        Draft202012Validator.check_schema(wrapped["schema"])


def valid(doc: dict[str, Any], message: str, document: Any) -> bool:
    return payload_validator(doc, message).is_valid(document)


def test_real_messages_validate_against_their_channel_payloads(doc: dict[str, Any]) -> None:
    for event in ex.ALL_EVENTS:
        assert valid(doc, "IngestEvent", orjson.loads(encode_event(event)))
    delta = Delta(
        kind=DeltaKind.ADDED, service="inventory", epoch="e1", revision=1, instance=ex.instance()
    )
    assert valid(doc, "Delta", delta.model_dump(mode="json"))
    assert valid(doc, "GroupDeadLetter", delta.model_dump(mode="json"))
    snap = Snapshot(service="inventory", epoch="e1", revision=1, instances=[ex.instance()])
    assert valid(doc, "Snapshot", snap.model_dump(mode="json"))
    for request in (SnapshotRequest(service="inventory"), SnapshotRequest(op="services")):
        assert valid(doc, "SnapshotRequest", request.model_dump(mode="json"))
    services = {
        "v": 1,
        "services": [{"service": "inventory", "epoch": "e1", "revision": 4, "instances": 2}],
    }
    assert valid(doc, "ServicesReply", services)
    assert valid(doc, "RequestError", {"v": 1, "error": "unavailable", "detail": "redis down"})
    assert not valid(doc, "RequestError", {"v": 1, "error": "oops", "detail": ""})
    dead = DeadLetter(
        reason="malformed",
        detail="x",
        stream="ns.ingest-0",
        partition=0,
        offset=7,
        size=3,
        body_b64="YWJj",
    )
    assert valid(doc, "DeadLetter", dead.model_dump(mode="json"))
    assert not valid(doc, "Delta", {"kind": "added"})
    bad_instance = delta.model_dump(mode="json")
    bad_instance["instance"]["address"] = "no-port"  # checked through the absolute $ref
    assert not valid(doc, "Delta", bad_instance)
    assert not valid(doc, "IngestEvent", {"v": 1, "type": "register", "service": "x"})
