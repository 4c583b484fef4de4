"""Eureka's JSON and XML documents, both directions, and apps__hashcode (pure)."""

from __future__ import annotations

import gzip
import xml.etree.ElementTree as ET

import orjson
import pytest

from busreg.gateway.eureka import codec

INSTANCE = {
    "instanceId": "10.0.0.7:orders:8080",
    "hostName": "h1",
    "app": "ORDERS",
    "ipAddr": "10.0.0.7",
    "status": "UP",
    "overriddenStatus": "UNKNOWN",
    "port": {"$": 8080, "@enabled": "true"},
    "securePort": {"$": 443, "@enabled": "false"},
    "countryId": 1,
    "dataCenterInfo": {
        "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
        "name": "MyOwn",
    },
    "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 90},
    "metadata": {"management.port": "8080", "my_key": "a$b"},
    "vipAddress": "orders",
    "actionType": "ADDED",
}


def test_hashcode_is_eurekas() -> None:
    assert codec.reconcile_hashcode(["UP", "DOWN", "UP", "OUT_OF_SERVICE"]) == (
        "DOWN_1_OUT_OF_SERVICE_1_UP_2_"
    )
    assert codec.reconcile_hashcode([]) == ""


def test_json_instance_round_trip() -> None:
    body = codec.encode("instance", INSTANCE, as_json=True)
    assert orjson.loads(body)["instance"]["port"] == {"$": 8080, "@enabled": "true"}
    assert codec.decode_instance(body, as_json=True) == INSTANCE


def test_empty_metadata_is_written_as_its_java_class() -> None:
    doc = {**INSTANCE, "metadata": {}}
    as_json = orjson.loads(codec.encode("instance", doc, as_json=True))
    assert as_json["instance"]["metadata"] == {"@class": codec.EMPTY_MAP_CLASS}
    as_xml = ET.fromstring(codec.encode("instance", doc, as_json=False))
    assert as_xml.find("metadata").attrib == {"class": codec.EMPTY_MAP_CLASS}  # type: ignore[union-attr]
    # and read back as an empty map, from either
    assert (
        codec.decode_instance(codec.encode("instance", doc, as_json=True), as_json=True)["metadata"]
        == {}
    )
    assert (
        codec.decode_instance(codec.encode("instance", doc, as_json=False), as_json=False)[
            "metadata"
        ]
        == {}
    )


def test_xml_follows_xstream() -> None:
    root = ET.fromstring(codec.encode("instance", INSTANCE, as_json=False))
    assert root.tag == "instance"
    port = root.find("port")
    assert port is not None
    assert (port.text, port.attrib) == ("8080", {"enabled": "true"})
    dc = root.find("dataCenterInfo")
    assert dc is not None
    assert dc.attrib["class"].endswith("DefaultDataCenterInfo")
    assert root.findtext("overriddenstatus") == "UNKNOWN"  # XStream's spelling
    md = root.find("metadata")
    assert md is not None
    # XStream's name coding: _ -> __, $ -> _-
    assert [c.tag for c in md] == ["management.port", "my__key"]
    assert md.findtext("my__key") == "a$b"


def test_xml_instance_round_trip_keeps_values_as_text() -> None:
    back = codec.decode_instance(codec.encode("instance", INSTANCE, as_json=False), as_json=False)
    assert back["metadata"] == INSTANCE["metadata"]
    assert back["port"] == {"$": "8080", "@enabled": "true"}
    assert back["overriddenStatus"] == "UNKNOWN"
    assert back["leaseInfo"] == {"renewalIntervalInSecs": "30", "durationInSecs": "90"}


@pytest.mark.parametrize("as_json", [True, False])
def test_applications_both_directions(as_json: bool) -> None:
    other = {**INSTANCE, "instanceId": "i-2", "status": "DOWN"}
    doc = codec.applications_doc(
        [("ORDERS", [INSTANCE, other]), ("BILLING", [{**INSTANCE, "app": "BILLING"}])],
        version=7,
        hashcode=codec.reconcile_hashcode(["UP", "DOWN", "UP"]),
    )
    back = codec.decode_applications(
        codec.encode("applications", doc, as_json=as_json), as_json=as_json
    )
    assert back["versions__delta"] == "7"
    assert back["apps__hashcode"] == "DOWN_1_UP_2_"
    assert [a["name"] for a in back["application"]] == ["ORDERS", "BILLING"]
    assert [i["instanceId"] for i in back["application"][0]["instance"]] == [
        "10.0.0.7:orders:8080",
        "i-2",
    ]


def test_applications_single_entries_and_empty() -> None:
    # Jettison-style JSON: one application and one instance as objects, not lists
    body = orjson.dumps(
        {
            "applications": {
                "apps__hashcode": "UP_1_",
                "application": {"name": "A", "instance": INSTANCE},
            }
        }
    )
    back = codec.decode_applications(body, as_json=True)
    assert back["application"][0]["instance"][0]["instanceId"] == INSTANCE["instanceId"]
    empty = codec.encode(
        "applications", codec.applications_doc([], version=1, hashcode=""), as_json=False
    )
    assert codec.decode_applications(empty, as_json=False)["application"] == []
    assert b"<apps__hashcode" in empty


@pytest.mark.parametrize(
    ("body", "as_json", "message"),
    [
        (b"{nope", True, "not valid JSON"),
        (b'{"other": {}}', True, '"instance"'),
        (b"<instance><a></instance>", False, "not well-formed"),
        (b"<application/>", False, "expected an <instance>"),
        (b'<!DOCTYPE i [<!ENTITY x "y">]><instance>&x;</instance>', False, "DOCTYPE"),
    ],
)
def test_refused_bodies(body: bytes, as_json: bool, message: str) -> None:
    with pytest.raises(codec.CodecError, match=message):
        codec.decode_instance(body, as_json=as_json)


def test_accept_rule_and_names() -> None:
    assert codec.wants_json("application/json")
    assert codec.wants_json("Application/JSON;q=0.9")
    assert not codec.wants_json(None)
    assert not codec.wants_json("application/xml")
    assert codec.xml_name("1bad") is None
    assert codec.xml_name("with space") is None
    # gzip is the caller's; the bytes are plain UTF-8 XML without a declaration
    body = codec.encode("instance", INSTANCE, as_json=False)
    assert body.startswith(b"<instance>")
    assert gzip.decompress(gzip.compress(body)) == body
