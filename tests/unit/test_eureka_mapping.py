"""Eureka InstanceInfo ↔ busreg Instance and events (pure)."""

from __future__ import annotations

import pytest

from busreg.gateway.eureka import mapping
from busreg.gateway.eureka.live import EventClock
from busreg.wire.models import Instance, InstanceStatus, Register, StatusOverride


def spring(**extra: object) -> mapping.EurekaInstance:
    """A registration as Spring Cloud's client sends it (strings where XML gives them)."""
    doc: dict[str, object] = {
        "instanceId": "host1:orders:8080",
        "hostName": "host1",
        "app": "ORDERS",
        "ipAddr": "10.0.0.7",
        "status": "UP",
        "port": {"$": "8080", "@enabled": "true"},
        "securePort": {"$": "443", "@enabled": "false"},
        "countryId": "1",
        "dataCenterInfo": {"@class": mapping.DEFAULT_CLASS, "name": "MyOwn"},
        "leaseInfo": {"renewalIntervalInSecs": "1", "durationInSecs": "3"},
        "metadata": {"@class": "java.util.Collections$EmptyMap"},
        "homePageUrl": "http://host1:8080/",
        "statusPageUrl": "http://host1:8080/actuator/info",
        "healthCheckUrl": "http://host1:8080/actuator/health",
        "vipAddress": "orders",
        "secureVipAddress": "orders",
        "lastDirtyTimestamp": "1733400000000",
    }
    doc.update(extra)
    return mapping.EurekaInstance.model_validate(doc)


def registered(info: mapping.EurekaInstance, incarnation: int = 1) -> Instance:
    return Register(
        incarnation=incarnation, seq=1, **mapping.register_fields(info, "orders")
    ).instance()


def test_register_fields() -> None:
    fields = mapping.register_fields(spring(), "orders")
    assert fields["address"] == "10.0.0.7:8080"
    assert fields["ttl"] == 3.0
    assert fields["zone"] == "default"
    assert fields["status"] is InstanceStatus.UP
    # only what differs from a native instance's defaults, plus status and lastDirtyTimestamp
    assert fields["metadata"] == {
        "eureka.hostName": "host1",
        "eureka.homePageUrl": "http://host1:8080/",
        "eureka.statusPageUrl": "http://host1:8080/actuator/info",
        "eureka.healthCheckUrl": "http://host1:8080/actuator/health",
        "eureka.status": "UP",
        "eureka.lastDirtyTimestamp": "1733400000000",
    }


def test_round_trip_to_eureka() -> None:
    out = mapping.to_eureka(registered(spring()), since=1733400000.0, changed=1733400001.0)
    assert out["app"] == "ORDERS"
    assert (out["hostName"], out["ipAddr"]) == ("host1", "10.0.0.7")
    assert out["port"] == {"$": 8080, "@enabled": "true"}
    assert out["securePort"] == {"$": 443, "@enabled": "false"}
    assert out["dataCenterInfo"] == {"@class": mapping.DEFAULT_CLASS, "name": "MyOwn"}
    assert out["leaseInfo"]["durationInSecs"] == 3
    assert out["leaseInfo"]["renewalIntervalInSecs"] == 1
    assert out["leaseInfo"]["registrationTimestamp"] == 1733400000000
    assert out["metadata"] == {}
    assert out["healthCheckUrl"] == "http://host1:8080/actuator/health"
    assert out["lastDirtyTimestamp"] == "1733400000000"
    assert out["overriddenStatus"] == "UNKNOWN"
    # and that reads back as the same registration
    again = mapping.EurekaInstance.model_validate(out)
    assert mapping.register_fields(again, "orders") == mapping.register_fields(spring(), "orders")


def test_native_instance_gets_sensible_defaults() -> None:
    native = Instance(
        service="inventory",
        instance_id="inv-1",
        incarnation=1,
        address="10.0.0.9:9000",
        zone="eu-1a",
        metadata={"version": "2.1"},
        ttl=3.0,
    )
    out = mapping.to_eureka(native)
    assert out["app"] == "INVENTORY"
    assert (out["hostName"], out["ipAddr"]) == ("10.0.0.9", "10.0.0.9")
    assert out["port"] == {"$": 9000, "@enabled": "true"}
    assert out["securePort"]["@enabled"] == "false"
    assert out["vipAddress"] == out["secureVipAddress"] == "inventory"
    assert out["homePageUrl"] == "http://10.0.0.9:9000/"
    assert out["dataCenterInfo"]["@class"] == mapping.DEFAULT_CLASS
    assert out["leaseInfo"]["durationInSecs"] == 3
    assert out["metadata"] == {"version": "2.1", "zone": "eu-1a"}


def test_zone_secure_port_and_amazon() -> None:
    info = spring(
        metadata={"zone": "eu west 1a"},
        port={"$": 8080, "@enabled": "false"},
        securePort={"$": 8443, "@enabled": "true"},
        dataCenterInfo={
            "@class": mapping.AMAZON_CLASS,
            "name": "Amazon",
            "metadata": {"instance-id": "i-1", "availability-zone": "x"},
        },
    )
    fields = mapping.register_fields(info, "orders")
    assert fields["zone"] == "eu_west_1a"
    assert fields["address"] == "10.0.0.7:8443"
    out = mapping.to_eureka(registered(info))
    assert out["securePort"] == {"$": 8443, "@enabled": "true"}
    assert out["port"] == {"$": 8080, "@enabled": "false"}
    assert out["dataCenterInfo"]["metadata"]["instance-id"] == "i-1"
    assert out["dataCenterInfo"]["@class"] == mapping.AMAZON_CLASS
    # the Amazon availability zone when no zone metadata
    amazon = spring(
        dataCenterInfo={
            "@class": mapping.AMAZON_CLASS,
            "name": "Amazon",
            "metadata": {"availability-zone": "us-east-1c"},
        }
    )
    assert amazon.zone() == "us-east-1c"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"instanceId": "", "hostName": ""}, "Missing instanceId"),
        ({"hostName": ""}, "Missing hostname"),
        ({"ipAddr": None}, "Missing ip address"),
        ({"app": ""}, "Missing appName"),
        ({"app": "BILLING"}, "Mismatched appName, expecting ORDERS but was BILLING"),
        ({"dataCenterInfo": None}, "Missing dataCenterInfo"),
        ({"dataCenterInfo": {"@class": mapping.DEFAULT_CLASS}}, "Missing dataCenterInfo Name"),
    ],
)
def test_eurekas_refusals(change: dict[str, object], message: str) -> None:
    assert spring(**change).refusal("orders") == message


def test_instance_id_falls_back_as_eureka_does() -> None:
    assert spring(instanceId="").instance_id == "host1"
    assert spring().refusal("Orders") is None  # app names compare upper-cased


def test_incarnation_is_deterministic() -> None:
    assert mapping.incarnation_of(spring(), 5) == 1733400000000 * 1_000_000
    assert mapping.incarnation_of(spring(lastDirtyTimestamp=""), 5) == 5


def test_heartbeat_carries_the_instances_own_status_under_an_override() -> None:
    inst = registered(spring())
    override = StatusOverride(status=InstanceStatus.OUT_OF_SERVICE, at=1, by="op")
    shown = inst.model_copy(update={"status": InstanceStatus.OUT_OF_SERVICE, "override": override})
    beat = mapping.heartbeat_event(shown, seq=9)
    assert beat.status is InstanceStatus.UP
    assert (beat.incarnation, beat.seq, beat.metadata) == (inst.incarnation, 9, inst.metadata)
    out = mapping.to_eureka(shown)
    assert (out["status"], out["overriddenStatus"]) == ("OUT_OF_SERVICE", "OUT_OF_SERVICE")
    # a native instance under an override: its own DOWN shows through, else it was UP
    native = Instance(service="s", instance_id="n", incarnation=1, address="h:1")
    down = native.model_copy(update={"status": InstanceStatus.DOWN, "override": override})
    assert mapping.eureka_status_of(down) is InstanceStatus.DOWN
    assert (
        mapping.eureka_status_of(
            native.model_copy(
                update={"status": InstanceStatus.OUT_OF_SERVICE, "override": override}
            )
        )
        is InstanceStatus.UP
    )


def test_unknown_status_registers_as_starting() -> None:
    assert (
        mapping.register_fields(spring(status="UNKNOWN"), "orders")["status"]
        is InstanceStatus.STARTING
    )


def test_case_rule_and_events() -> None:
    assert mapping.service_of("ORDERS-API") == "orders-api"
    inst = registered(spring())
    gone = mapping.deregister_event(inst, seq=3)
    assert (gone.incarnation, gone.seq) == (inst.incarnation, 3)
    updated = mapping.updated_event(inst, 4, {**inst.metadata, "version": "2"})
    assert updated.metadata["version"] == "2"
    assert updated.status is InstanceStatus.UP


def test_event_clock_grows_without_state_per_instance() -> None:
    clock = EventClock(lambda: 1_000_000_000)
    assert [clock.next(), clock.next(), clock.next()] == [1_000_000, 1_000_001, 1_000_002]
    assert EventClock().next() < 2**53
