"""Example contract objects shared by the unit tests (no servers, no I/O)."""

from __future__ import annotations

from typing import Any

from busreg.wire.models import Deregister, Heartbeat, Instance, InstanceStatus, Register, Tick

INCARNATION = 1_732_600_000_123_456_789  # time.time_ns() of some run


def register(**overrides: Any) -> Register:
    fields: dict[str, Any] = {
        "service": "inventory",
        "instance_id": "inv-1",
        "incarnation": INCARNATION,
        "seq": 1,
        "address": "10.0.0.7:8080",
        "zone": "eu-1a",
        "metadata": {"version": "2.1", "git": "abc123"},
        "ttl": 3.0,
    }
    fields.update(overrides)
    return Register(**fields)


def heartbeat(**overrides: Any) -> Heartbeat:
    fields = register().model_dump(exclude={"type"})
    fields.update(seq=2, status=InstanceStatus.UP)
    fields.update(overrides)
    return Heartbeat(**fields)


def deregister(**overrides: Any) -> Deregister:
    fields: dict[str, Any] = {
        "service": "inventory",
        "instance_id": "inv-1",
        "incarnation": INCARNATION,
        "seq": 3,
    }
    fields.update(overrides)
    return Deregister(**fields)


def tick(worker: str = "worker-a1b2") -> Tick:
    return Tick(worker=worker)


def instance(instance_id: str = "inv-1", **overrides: Any) -> Instance:
    fields: dict[str, Any] = {
        "service": "inventory",
        "instance_id": instance_id,
        "incarnation": INCARNATION,
        "address": "10.0.0.7:8080",
        "zone": "eu-1a",
        "metadata": {"version": "2.1"},
    }
    fields.update(overrides)
    return Instance(**fields)


ALL_EVENTS = [
    register(),
    register(address="[::1]:8080", metadata={}, status=InstanceStatus.STARTING, ttl=60),
    register(address="inventory-7.svc.cluster.local:80", zone="default", seq=0, incarnation=0),
    heartbeat(),
    heartbeat(status=InstanceStatus.OUT_OF_SERVICE, metadata={"k" * 128: "v" * 1024}),
    deregister(),
    tick(),
]
