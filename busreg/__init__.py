"""busreg: a service registry on RabbitMQ streams and Redis.

Public surface (guarded by a test): everything a user imports comes from here. ``Worker``
is loaded on first use, so an application that only registers and watches never imports
the worker side (its Lua scripts, metrics and prometheus_client).
"""

from typing import TYPE_CHECKING, Any

from busreg.callers.balancer import RoundRobin, ZoneAware
from busreg.callers.retry import RetryBudget, RetryPolicy
from busreg.client.checks import CommandCheck, HttpCheck, TcpCheck
from busreg.client.registration import Registration
from busreg.client.registry import Registry
from busreg.client.revisions import Change
from busreg.client.view import ServiceView
from busreg.errors import (
    AuthenticationFailed,
    BusregError,
    ClosedError,
    ConfigurationError,
    ConnectionFailed,
    Fenced,
    InvalidEvent,
    NoInstanceAvailable,
    PartitionMismatch,
    PublishFailed,
    RequestTimeout,
    TopologyMissing,
)
from busreg.settings import ClientSettings, Settings, WorkerSettings
from busreg.wire.models import (
    Delta,
    DeltaKind,
    Instance,
    InstanceStatus,
    Snapshot,
    StatusOverride,
)
from busreg.wire.routing import partition_for

if TYPE_CHECKING:
    from busreg.server.worker import Worker

__version__ = "0.1.0"

__all__ = [
    "AuthenticationFailed",
    "BusregError",
    "Change",
    "ClientSettings",
    "ClosedError",
    "CommandCheck",
    "ConfigurationError",
    "ConnectionFailed",
    "Delta",
    "DeltaKind",
    "Fenced",
    "HttpCheck",
    "Instance",
    "InstanceStatus",
    "InvalidEvent",
    "NoInstanceAvailable",
    "PartitionMismatch",
    "PublishFailed",
    "Registration",
    "Registry",
    "RequestTimeout",
    "RetryBudget",
    "RetryPolicy",
    "RoundRobin",
    "ServiceView",
    "Settings",
    "Snapshot",
    "StatusOverride",
    "TcpCheck",
    "TopologyMissing",
    "Worker",
    "WorkerSettings",
    "ZoneAware",
    "__version__",
    "partition_for",
]


def __getattr__(name: str) -> Any:
    if name == "Worker":
        from busreg.server.worker import Worker

        return Worker
    raise AttributeError(f"module 'busreg' has no attribute {name!r}")
