"""Eureka's InstanceInfo ↔ busreg's Instance and ingest events. Pure: no I/O.

The rules (docs/eureka.md has them as a table):

* app name ↔ service: a Eureka write for ``{APP}`` acts on service ``APP.lower()``; Eureka
  reads show every service as ``service.upper()`` and match names case-insensitively.
* instanceId ↔ instance_id; address = ``ipAddr:port`` (the non-secure port when enabled,
  else the secure one); zone = metadata ``zone``, else the Amazon ``availability-zone``;
  ttl = ``leaseInfo.durationInSecs``; status = the instance's own status (UNKNOWN registers
  as STARTING: not routable); an operator's override is busreg's ``Instance.override``.
* Eureka-only fields travel in busreg metadata under ``eureka.<field>``, and only where they
  differ from what a natively registered instance shows (``native_fields``): a native
  instance and a Eureka one read back the same way, and few of the 64 entries are used.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from busreg.wire.models import Deregister, Heartbeat, Instance, InstanceStatus, Register

__all__ = [
    "AMAZON_CLASS",
    "DEFAULT_CLASS",
    "PREFIX",
    "EurekaInstance",
    "deregister_event",
    "eureka_status_of",
    "heartbeat_event",
    "incarnation_of",
    "native_fields",
    "register_fields",
    "service_of",
    "to_eureka",
    "updated_event",
]

#: Metadata keys with this prefix carry Eureka's own fields; they are not user metadata.
PREFIX = "eureka."
DEFAULT_CLASS = "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo"
AMAZON_CLASS = "com.netflix.appinfo.AmazonInfo"
#: Eureka's default lease (LeaseInfo.DEFAULT_LEASE_DURATION).
DEFAULT_DURATION = 90
ActionType = Literal["ADDED", "MODIFIED", "DELETED"]

_ZONE_BAD = re.compile(r"[^A-Za-z0-9_.-]")
_TEXT = frozenset(
    {"instanceId", "hostName", "app", "ipAddr", "status", "homePageUrl", "statusPageUrl",
     "healthCheckUrl", "secureHealthCheckUrl", "vipAddress", "secureVipAddress",
     "appGroupName", "asgName"}
)  # fmt: skip


def service_of(app: str) -> str:
    """The busreg service a Eureka app name writes to."""
    return app.lower()


# --- the request model ------------------------------------------------------------------------


def _port(value: Any) -> Any:
    if isinstance(value, dict):
        return {"port": value.get("$", 0), "enabled": value.get("@enabled", "true")}
    if value is None or isinstance(value, int | str):
        return {"port": value or 0, "enabled": "true"}
    return value


class Port(BaseModel):
    model_config = ConfigDict(extra="ignore")

    port: int = Field(0, ge=0, le=65535)
    enabled: bool = True


class DataCenter(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    cls: str = Field(DEFAULT_CLASS, alias="@class")
    name: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class Lease(BaseModel):
    model_config = ConfigDict(extra="ignore")

    renewalIntervalInSecs: int = Field(30, ge=0)
    durationInSecs: int = Field(DEFAULT_DURATION, ge=0)


class EurekaInstance(BaseModel):
    """A registration as a Eureka client sends it (JSON or XML, decoded by the codec).
    Lenient about types as Eureka is (numbers as strings, booleans as "true")."""

    model_config = ConfigDict(extra="ignore")

    instanceId: str = ""
    hostName: str = ""
    app: str = ""
    ipAddr: str = ""
    status: str = "UP"
    port: Port = Port(port=0, enabled=True)
    securePort: Port = Port(port=443, enabled=False)
    countryId: int = 1
    dataCenterInfo: DataCenter | None = None
    leaseInfo: Lease = Lease()
    metadata: dict[str, str] = Field(default_factory=dict)
    homePageUrl: str = ""
    statusPageUrl: str = ""
    healthCheckUrl: str = ""
    secureHealthCheckUrl: str = ""
    vipAddress: str = ""
    secureVipAddress: str = ""
    appGroupName: str = ""
    asgName: str = ""
    lastDirtyTimestamp: int = Field(0, ge=0)

    _ports = field_validator("port", "securePort", mode="before")(_port)

    @model_validator(mode="before")
    @classmethod
    def _given(cls, value: Any) -> Any:
        # XML gives "" for an empty element and JSON may send null: both mean "not given",
        # so the field's default applies; scalars arrive as numbers or strings alike
        if not isinstance(value, dict):
            return value
        out: dict[str, Any] = {}
        for key, item in value.items():
            if item is None or item == "":
                continue
            out[key] = str(item) if isinstance(item, int | float) and key in _TEXT else item
        return out

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, dict):
            return {str(k): "" if v is None else str(v) for k, v in value.items() if k != "@class"}
        return value

    @property
    def instance_id(self) -> str:
        """Eureka's InstanceInfo.getId(): the instanceId, else the Amazon instance id, else
        the host name."""
        if self.instanceId:
            return self.instanceId
        if self.dataCenterInfo is not None and self.dataCenterInfo.metadata.get("instance-id"):
            return self.dataCenterInfo.metadata["instance-id"]
        return self.hostName

    def refusal(self, app: str) -> str | None:
        """Eureka's own checks (ApplicationResource.addInstance), in its order."""
        if not self.instance_id:
            return "Missing instanceId"
        if not self.hostName:
            return "Missing hostname"
        if not self.ipAddr:
            return "Missing ip address"
        if not self.app:
            return "Missing appName"
        if self.app.upper() != app.upper():
            return f"Mismatched appName, expecting {app.upper()} but was {self.app.upper()}"
        if self.dataCenterInfo is None:
            return "Missing dataCenterInfo"
        if not self.dataCenterInfo.name:
            return "Missing dataCenterInfo Name"
        if self.leaseInfo.durationInSecs < 0:
            return "leaseInfo.durationInSecs must not be negative"
        return None

    def address(self) -> str:
        # the non-secure port when enabled (busreg callers speak plain HTTP), else the
        # secure one when that is enabled
        secure = self.securePort.enabled and not self.port.enabled
        port = self.securePort.port if secure else self.port.port
        host = f"[{self.ipAddr}]" if ":" in self.ipAddr else self.ipAddr
        return f"{host}:{port}"

    def zone(self) -> str:
        zone = self.metadata.get("zone", "")
        if not zone and self.dataCenterInfo is not None:
            zone = self.dataCenterInfo.metadata.get("availability-zone", "")
        return _ZONE_BAD.sub("_", zone)[:64] or "default"

    def own_status(self) -> InstanceStatus:
        try:
            return InstanceStatus(self.status.upper())
        except ValueError:  # UNKNOWN (or anything else): registered, but not routable
            return InstanceStatus.STARTING

    def fields(self) -> dict[str, str]:
        """Every Eureka-only field, flat, as it would be stored (before dropping defaults)."""
        dc = self.dataCenterInfo or DataCenter(name="MyOwn")
        return {
            "hostName": self.hostName,
            "ipAddr": self.ipAddr,
            "port": str(self.port.port),
            "port.enabled": _bool(self.port.enabled),
            "securePort": str(self.securePort.port),
            "securePort.enabled": _bool(self.securePort.enabled),
            "vipAddress": self.vipAddress,
            "secureVipAddress": self.secureVipAddress,
            "homePageUrl": self.homePageUrl,
            "statusPageUrl": self.statusPageUrl,
            "healthCheckUrl": self.healthCheckUrl,
            "secureHealthCheckUrl": self.secureHealthCheckUrl,
            "dataCenterInfo.name": dc.name or "MyOwn",
            "dataCenterInfo.class": dc.cls,
            "dataCenterInfo.metadata": (
                orjson.dumps(dc.metadata, option=orjson.OPT_SORT_KEYS).decode()
                if dc.metadata
                else ""
            ),
            "countryId": str(self.countryId),
            "leaseInfo.renewalIntervalInSecs": str(self.leaseInfo.renewalIntervalInSecs),
            "status": self.status.upper(),
            "lastDirtyTimestamp": str(self.lastDirtyTimestamp),
            "appGroupName": self.appGroupName,
            "asgName": self.asgName,
        }


def _bool(value: bool) -> str:
    return "true" if value else "false"


# --- Eureka -> busreg -------------------------------------------------------------------------


def native_fields(service: str, address: str, ttl: float) -> dict[str, str]:
    """The Eureka fields a natively registered instance shows (no ``eureka.*`` metadata)."""
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    duration = max(1, math.ceil(ttl))
    return {
        "hostName": host,
        "ipAddr": host,
        "port": port,
        "port.enabled": "true",
        "securePort": "443",
        "securePort.enabled": "false",
        "vipAddress": service,
        "secureVipAddress": service,
        "homePageUrl": f"http://{address}/",
        "statusPageUrl": "",
        "healthCheckUrl": "",
        "secureHealthCheckUrl": "",
        "dataCenterInfo.name": "MyOwn",
        "dataCenterInfo.class": DEFAULT_CLASS,
        "dataCenterInfo.metadata": "",
        "countryId": "1",
        # busreg's own clients renew at a third of the TTL (1 s of 3 s), as Eureka's 30 of 90
        "leaseInfo.renewalIntervalInSecs": str(max(1, duration // 3)),
        "status": "",
        "lastDirtyTimestamp": "",
        "appGroupName": "",
        "asgName": "",
    }


def incarnation_of(info: EurekaInstance, now_ns: int) -> int:
    """A new registration's incarnation, in nanoseconds like a native one's: derived from
    the client's ``lastDirtyTimestamp`` (ms) so a retried register (its reply lost) is the
    same event again, not a restart; ``now_ns`` only for a client that sends none."""
    if info.lastDirtyTimestamp > 0:
        return min(info.lastDirtyTimestamp * 1_000_000, 2**63 - 1)
    return now_ns


def register_fields(info: EurekaInstance, service: str) -> dict[str, Any]:
    """The fields of a Register/Heartbeat for ``info`` (without incarnation and seq)."""
    address = info.address()
    ttl = float(info.leaseInfo.durationInSecs or DEFAULT_DURATION)
    defaults = native_fields(service, address, ttl)
    metadata = {k: v for k, v in info.metadata.items() if not k.startswith(PREFIX)}
    for key, value in info.fields().items():
        # status and lastDirtyTimestamp always: renewals are checked against them
        if key in ("status", "lastDirtyTimestamp") or value != defaults[key]:
            metadata[PREFIX + key] = value
    return {
        "service": service,
        "instance_id": info.instance_id,
        "address": address,
        "zone": info.zone(),
        "status": info.own_status(),
        "metadata": metadata,
        "ttl": ttl,
    }


def eureka_status_of(instance: Instance) -> InstanceStatus:
    """The instance's own status (not an override's): what its renewals must carry on."""
    stored = instance.metadata.get(PREFIX + "status")
    if stored:
        try:
            return InstanceStatus(stored)
        except ValueError:
            return InstanceStatus.STARTING
    override = instance.override
    if override is None:
        return instance.status
    # a native instance under an override: its own DOWN/STARTING would show through
    if instance.status is not override.status:
        return instance.status
    return InstanceStatus.UP


def heartbeat_event(instance: Instance, seq: int) -> Heartbeat:
    """A renewal of ``instance`` as the live view knows it: the whole registration again."""
    return Heartbeat(
        service=instance.service,
        instance_id=instance.instance_id,
        incarnation=instance.incarnation,
        seq=seq,
        address=instance.address,
        zone=instance.zone,
        status=eureka_status_of(instance),
        metadata=instance.metadata,
        ttl=instance.ttl,
    )


def updated_event(instance: Instance, seq: int, metadata: dict[str, str]) -> Register:
    """A re-registration of ``instance`` with new metadata (Eureka's metadata PUT)."""
    return Register(
        **{**heartbeat_event(instance, seq).model_dump(exclude={"type"}), "metadata": metadata}
    )


def deregister_event(instance: Instance, seq: int) -> Deregister:
    return Deregister(
        service=instance.service,
        instance_id=instance.instance_id,
        incarnation=instance.incarnation,
        seq=seq,
    )


# --- busreg -> Eureka -------------------------------------------------------------------------


def _ms(seconds: float | None) -> int:
    return 0 if seconds is None else int(seconds * 1000)


def to_eureka(
    instance: Instance,
    *,
    since: float | None = None,
    changed: float | None = None,
    action: ActionType = "ADDED",
) -> dict[str, Any]:
    """``instance`` as Eureka's InstanceInfo (JSON shape, see busreg.gateway.eureka.codec).
    ``since``/``changed``: unix seconds the gateway first saw this incarnation and saw it
    change last (lease timestamps); busreg does not expose renewals, so
    ``lastRenewalTimestamp`` is the last change."""
    md = instance.metadata
    fields = native_fields(instance.service, instance.address, instance.ttl)
    for key in fields:
        stored = md.get(PREFIX + key)
        if stored is not None:
            fields[key] = stored
    metadata = {k: v for k, v in md.items() if not k.startswith(PREFIX)}
    if instance.zone != "default":
        metadata.setdefault("zone", instance.zone)
    dc: dict[str, Any] = {
        "@class": fields["dataCenterInfo.class"],
        "name": fields["dataCenterInfo.name"],
    }
    if fields["dataCenterInfo.metadata"]:
        try:
            dc["metadata"] = orjson.loads(fields["dataCenterInfo.metadata"])
        except orjson.JSONDecodeError:
            dc["metadata"] = {}
    changed = changed if changed is not None else since
    out: dict[str, Any] = {
        "instanceId": instance.instance_id,
        "hostName": fields["hostName"],
        "app": instance.service.upper(),
        "ipAddr": fields["ipAddr"],
        "status": instance.status.value,
        "overriddenStatus": (
            instance.override.status.value if instance.override is not None else "UNKNOWN"
        ),
        "port": {"$": int(fields["port"]), "@enabled": fields["port.enabled"]},
        "securePort": {"$": int(fields["securePort"]), "@enabled": fields["securePort.enabled"]},
        "countryId": int(fields["countryId"]),
        "dataCenterInfo": dc,
        "leaseInfo": {
            "renewalIntervalInSecs": int(fields["leaseInfo.renewalIntervalInSecs"]),
            "durationInSecs": max(1, math.ceil(instance.ttl)),
            "registrationTimestamp": _ms(since),
            "lastRenewalTimestamp": _ms(changed),
            "evictionTimestamp": 0,
            "serviceUpTimestamp": _ms(since),
        },
        "metadata": metadata,
    }
    if fields["appGroupName"]:
        out["appGroupName"] = fields["appGroupName"]
    for key in ("homePageUrl", "statusPageUrl", "healthCheckUrl", "secureHealthCheckUrl"):
        if fields[key]:
            out[key] = fields[key]
    out["vipAddress"] = fields["vipAddress"]
    out["secureVipAddress"] = fields["secureVipAddress"]
    out["isCoordinatingDiscoveryServer"] = "false"
    out["lastUpdatedTimestamp"] = str(_ms(changed))
    out["lastDirtyTimestamp"] = fields["lastDirtyTimestamp"] or str(_ms(changed))
    out["actionType"] = action
    if fields["asgName"]:
        out["asgName"] = fields["asgName"]
    return out
