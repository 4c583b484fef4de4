"""busreg.wire.models: what an event may contain, and Instance's host/port."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from busreg.constants import MAX_TTL
from busreg.wire.models import Delta, Instance, InstanceStatus, Register, SnapshotRequest

from . import examples as ex


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.7:8080",
        "localhost:1",
        "inventory-7.svc.cluster.local:65535",
        "[::1]:8080",
        "[2001:db8::7]:443",
        "[::ffff:10.0.0.7]:80",
    ],
)
def test_register_accepts_host_port(address: str) -> None:
    assert ex.register(address=address).address == address


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.7",  # no port
        "10.0.0.7:",
        ":8080",
        "host:port",
        "host:123456",
        "::1:8080",  # IPv6 without brackets
        "[::1]",
        "[zz::1]:80",
        "a b:80",
        "http://host:80",
        "host:80/path",
        "h" * 254 + ":80",
        "",
    ],
)
def test_register_rejects_bad_address(address: str) -> None:
    with pytest.raises(ValidationError, match="address"):
        ex.register(address=address)


@pytest.mark.parametrize("address", ["host:0", "host:65536", "host:99999"])
def test_register_rejects_port_out_of_range(address: str) -> None:
    with pytest.raises(ValidationError, match="address"):
        ex.register(address=address)


def test_metadata_limits() -> None:
    assert len(ex.register(metadata={f"k{i}": "v" for i in range(64)}).metadata) == 64
    with pytest.raises(ValidationError, match="at most 64 metadata entries"):
        ex.register(metadata={f"k{i}": "v" for i in range(65)})
    ex.register(metadata={"k" * 128: "v" * 1024})
    for bad in ({"k" * 129: "v"}, {"": "v"}, {"k": "v" * 1025}):
        with pytest.raises(ValidationError, match="metadata"):
            ex.register(metadata=bad)


@pytest.mark.parametrize("ttl", [0.001, 3, 90, MAX_TTL])  # 90: Eureka's default lease
def test_ttl_accepted(ttl: float) -> None:
    assert ex.register(ttl=ttl).ttl == ttl


@pytest.mark.parametrize("ttl", [0, -1, MAX_TTL + 0.001, 121, 3600])
def test_ttl_rejected(ttl: float) -> None:
    assert MAX_TTL == 120
    with pytest.raises(ValidationError, match="ttl"):
        ex.register(ttl=ttl)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("service", "has space"),
        ("service", "-leading-dash"),
        ("service", "x" * 101),
        ("instance_id", "a/b"),
        ("instance_id", "x" * 129),
        ("zone", ""),
        ("incarnation", -1),
        ("incarnation", 2**63),
        ("seq", -1),
        ("seq", 2**53),
        ("status", "ALIVE"),
        ("v", 2),
    ],
)
def test_register_rejects_bad_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=field):
        ex.register(**{field: value})


def test_events_are_strict_and_frozen() -> None:
    with pytest.raises(ValidationError, match="extra"):
        Register.model_validate({**ex.register().model_dump(), "extra": 1})
    event = ex.register()
    with pytest.raises(ValidationError, match="frozen"):
        setattr(event, "seq", 5)  # noqa: B010 (mypy without the pydantic plugin)


def test_register_instance_carries_the_registration() -> None:
    event = ex.register(status=InstanceStatus.STARTING, ttl=7)
    inst = event.instance()
    assert inst == Instance(
        service="inventory",
        instance_id="inv-1",
        incarnation=ex.INCARNATION,
        address="10.0.0.7:8080",
        zone="eu-1a",
        status=InstanceStatus.STARTING,
        metadata={"version": "2.1", "git": "abc123"},
        ttl=7,
    )


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("10.0.0.7:8080", "10.0.0.7", 8080),
        ("inventory.svc.local:80", "inventory.svc.local", 80),
        ("[::1]:8080", "::1", 8080),
        ("[2001:db8::7]:443", "2001:db8::7", 443),
    ],
)
def test_instance_host_and_port(address: str, host: str, port: int) -> None:
    inst = ex.instance(address=address)
    assert inst.host == host
    assert inst.port == port


def test_subscriber_side_models_ignore_unknown_fields() -> None:
    # outbound contracts may grow: an old subscriber must still read a newer delta
    data = {
        "v": 1,
        "kind": "added",
        "service": "inventory",
        "epoch": "ab12",
        "revision": 3,
        "instance": {**ex.instance().model_dump(mode="json"), "new_field": 1},
        "reason": None,
        "another_new_field": True,
    }
    assert Delta.model_validate(data).instance == ex.instance()


def test_snapshot_request_needs_known_op() -> None:
    assert SnapshotRequest().op == "snapshot"
    with pytest.raises(ValidationError):
        SnapshotRequest.model_validate({"op": "drop-everything"})
