"""The event contracts, as pydantic models (exported to ``schemas/`` as JSON Schema).

Ingest events (instance → stream)::

    Register(service="inventory", instance_id="inv-1", incarnation=..., seq=1,
             address="10.0.0.7:8080", zone="eu-1a", metadata={"version": "2.1"})

Every ingest event carries ``v`` (contract version), the instance's ``incarnation`` (fixed
for one run of the instance, larger for a later run) and ``seq`` (grows with every event of
that incarnation). A worker applies an event only if ``(incarnation, seq)`` is newer than
what it has, so duplicates and reordering change nothing (invariant 2). Register and
heartbeat both carry the whole registration: a worker that lost its state rebuilds an
instance from its next heartbeat.

Deltas and snapshots (worker → subscribers) carry the service's ``epoch`` and
``revision``: revisions grow by one with every visible change of the service, within an
epoch; a new epoch (state rebuilt) or a skipped revision tells a subscriber to re-read a
snapshot (invariant 5).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from busreg import constants as c

__all__ = [
    "Delta",
    "DeltaKind",
    "Deregister",
    "Heartbeat",
    "Heartbeats",
    "IngestEvent",
    "Instance",
    "InstanceStatus",
    "LeaseTiming",
    "OverrideStatus",
    "Register",
    "SetStatus",
    "Snapshot",
    "SnapshotRequest",
    "StatusOverride",
    "Tick",
    "first_error",
    "validation_message",
]

#: What each name may hold, in words: the field descriptions, and what a refused name is
#: told instead of the pattern (first_error).
NAME_RULES = {
    "service": "letters, digits, '.', '_', '-', starting with a letter or digit; "
    "at most 100 characters",
    "instance_id": "letters, digits, '.', '_', ':', '@', '-', starting with a letter or "
    "digit; at most 128 characters",
    "address": "host:port, IPv6 in brackets ([::1]:8080), port 1-65535",
    "zone": "letters, digits, '.', '_', '-'; 1-64 characters",
}

ServiceName = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
        description=f"Service name: {NAME_RULES['service']}.",
    ),
]
InstanceId = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$",
        description=f"Instance id, unique within its service: {NAME_RULES['instance_id']}.",
    ),
]


def _check_port(value: str) -> str:
    if not 1 <= int(value.rsplit(":", 1)[1]) <= 65535:
        raise ValueError("port must be 1-65535")
    return value


Address = Annotated[
    str,
    Field(
        pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]{1,253}):[0-9]{1,5}$",
        description=f"{NAME_RULES['address']}.",
    ),
    AfterValidator(_check_port),
]
Zone = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Ttl = Annotated[
    float, Field(gt=0, le=c.MAX_TTL, allow_inf_nan=False, description="Lease TTL in seconds.")
]
#: Contract version of an ingest event: exactly the integer 1 (``true`` or ``"1"`` are not).
Version = Annotated[
    int, Strict(), Field(ge=1, le=1, json_schema_extra={"const": 1}, description="Version: 1.")
]


class InstanceStatus(StrEnum):
    """Eureka's instance statuses; load balancers choose only UP instances."""

    UP = "UP"
    DOWN = "DOWN"
    STARTING = "STARTING"
    OUT_OF_SERVICE = "OUT_OF_SERVICE"


class DeltaKind(StrEnum):
    ADDED = "added"
    MODIFIED = "modified"
    REMOVED = "removed"


def _check_metadata(value: dict[str, str]) -> dict[str, str]:
    if len(value) > 64:
        raise ValueError("at most 64 metadata entries")
    for key, item in value.items():
        if not key or len(key) > 128 or len(item) > 1024:
            raise ValueError("metadata keys are 1-128 characters, values at most 1024")
    return value


class _Registration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Version = 1
    service: ServiceName
    instance_id: InstanceId
    incarnation: int = Field(ge=0, lt=2**63)
    seq: int = Field(ge=0, lt=2**53)
    address: Address
    zone: Zone = "default"
    status: InstanceStatus = InstanceStatus.UP
    metadata: dict[str, str] = Field(default_factory=dict)
    ttl: Ttl = c.DEFAULT_TTL

    _meta = field_validator("metadata")(_check_metadata)

    def instance(self) -> Instance:
        return Instance(
            service=self.service,
            instance_id=self.instance_id,
            incarnation=self.incarnation,
            address=self.address,
            zone=self.zone,
            status=self.status,
            metadata=self.metadata,
            ttl=self.ttl,
        )


class LeaseTiming(BaseModel):
    """How a registration renews: checked where it is made (``Registry.register``, the CLI),
    since the interval never travels.

    >>> LeaseTiming(ttl=3.0, interval=1.0).interval
    1.0
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttl: Ttl
    interval: float = Field(gt=0, le=c.MAX_HEARTBEAT_INTERVAL, allow_inf_nan=False)

    @model_validator(mode="after")
    def _interval_below_ttl(self) -> LeaseTiming:
        if self.interval >= self.ttl:
            raise ValueError(
                f"the heartbeat interval ({self.interval}s) must be below the ttl ({self.ttl}s)"
            )
        return self


class Register(_Registration):
    """An instance announces itself (or changes its status/metadata)."""

    type: Literal["register"] = "register"


class Heartbeat(_Registration):
    """Periodic renewal; carries the whole registration so lost state heals by itself."""

    type: Literal["heartbeat"] = "heartbeat"


class Deregister(BaseModel):
    """Graceful shutdown: the instance is removed at once and subscribers are told."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Version = 1
    type: Literal["deregister"] = "deregister"
    service: ServiceName
    instance_id: InstanceId
    incarnation: int = Field(ge=0, lt=2**63)
    seq: int = Field(ge=0, lt=2**53)


#: The statuses an operator may force (``busreg set-status``); STARTING is the instance's own.
OverrideStatus = Literal["UP", "DOWN", "OUT_OF_SERVICE"]


class SetStatus(BaseModel):
    """An operator overrides an instance's status, or clears the override (``status=None``),
    as Eureka's ``PUT .../status?value=OUT_OF_SERVICE`` does::

        SetStatus(service="inventory", instance_id="inv-1", status="OUT_OF_SERVICE",
                  by="alice", reason="drain before deploy")

    The override holds for the instance's current incarnation: its heartbeats and
    re-registrations keep it; a restart (new incarnation), a removal or a clear ends it.
    The instance's own DOWN or STARTING still wins (an operator cannot make a failing
    instance UP). Authorised like any event of the service, or with the operators' admin
    key (busreg.wire.auth). Ordered by the partition stream: the last one applied wins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Version = 1
    type: Literal["set-status"] = "set-status"
    service: ServiceName
    instance_id: InstanceId
    status: OverrideStatus | None
    by: str = Field(min_length=1, max_length=128, description="Who set it (operator name).")
    reason: str = Field("", max_length=256)


class StatusOverride(BaseModel):
    """An operator's override as subscribers see it (``Instance.override``): ``status`` is
    what was forced, ``at`` broker time in ms, ``identity`` who the worker verified
    (``"user:<name>"``, ``"key:<service>"``, ``"admin-key"``; None with auth off)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    status: InstanceStatus
    at: int
    by: str
    reason: str = ""
    identity: str | None = None


class Tick(BaseModel):
    """Written by workers into every partition: the watermark (invariant 4).

    ``outage=True`` is an *outage mark*: the worker lost its way to this stream (its leader
    moved, or the node its publisher was on went away), so every writer has to find the
    stream again, and the owner opens the outage grace (apply.lua). With auth enforced, a
    mark counts only if signed with the workers' key (``auth.worker_key``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Version = 1
    type: Literal["tick"] = "tick"
    worker: str = Field(max_length=128)
    outage: bool = False


class Heartbeats(BaseModel):
    """Renewals of several instances of one partition in one event (contract v2).

    Each item is a heartbeat event exactly as it would be sent alone: its JSON, signed
    (``<sig>.<json>``) when auth is enforced, so each is validated and authorised by itself
    and a bad one is dead-lettered alone. One message instead of one per instance: the
    broker's cost is per message, not per byte.

        Heartbeats(items=[signed_heartbeat_json, ...])
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[2] = 2
    type: Literal["heartbeats"] = "heartbeats"
    items: list[str] = Field(min_length=1, max_length=c.MAX_BATCH_ITEMS)


IngestEvent = Annotated[
    Register | Heartbeat | Deregister | SetStatus | Tick | Heartbeats, Field(discriminator="type")
]
ingest_adapter: TypeAdapter[Register | Heartbeat | Deregister | SetStatus | Tick | Heartbeats] = (
    TypeAdapter(IngestEvent)
)


class Instance(BaseModel):
    """A registered instance as subscribers see it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    service: ServiceName
    instance_id: InstanceId
    incarnation: int
    address: Address
    zone: Zone = "default"
    status: InstanceStatus = InstanceStatus.UP
    metadata: dict[str, str] = Field(default_factory=dict)
    ttl: float = c.DEFAULT_TTL
    #: Set while an operator overrides the status (``status`` is then the effective one).
    override: StatusOverride | None = None

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


class Delta(BaseModel):
    """One visible change of one service, published on the service's exchange."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = 1
    kind: DeltaKind
    service: ServiceName
    epoch: str
    revision: int = Field(ge=1)
    instance: Instance
    reason: Literal["deregistered", "expired"] | None = None


class Snapshot(BaseModel):
    """A service's whole instance set at one revision (the 'list' of list-then-watch)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = 1
    service: ServiceName
    epoch: str
    revision: int = Field(ge=0)
    instances: list[Instance]


class SnapshotRequest(BaseModel):
    """Request on the RPC queue: ``snapshot`` of one service or ``services`` overview."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    op: Literal["snapshot", "services"] = "snapshot"
    service: ServiceName | None = None


def first_error(exc: ValidationError) -> tuple[str, str]:
    """``(dotted location, message)`` of the first error pydantic reports (location '' for
    the whole value)."""
    err = exc.errors()[0]
    location = ".".join(str(p) for p in err["loc"])
    field = str(err["loc"][-1]) if err["loc"] else ""
    if err["type"] == "string_pattern_mismatch" and field in NAME_RULES:
        # the rule in words, not the regular expression
        return location, f"{err['input']!r} is not valid: use {NAME_RULES[field]}"
    if err["type"] == "value_error" and "error" in err.get("ctx", {}):
        return location, str(err["ctx"]["error"])  # without pydantic's "Value error, "
    return location, str(err["msg"])


def validation_message(exc: ValidationError, where: str = "") -> str:
    """One line for a refused value: ``"<location>: <message>"`` (``where`` stands in for an
    empty location; with neither, the message alone)."""
    location, message = first_error(exc)
    location = location or where
    return f"{location}: {message}" if location else message
