"""busreg: a service registry on RabbitMQ streams and Redis.

Public surface (guarded by a test): everything a user imports comes from here.
"""

from busreg.callers.balancer import RoundRobin, ZoneAware
from busreg.callers.retry import RetryBudget, RetryPolicy
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
from busreg.server.worker import Worker
from busreg.settings import ClientSettings, Settings, WorkerSettings
from busreg.wire.models import Delta, DeltaKind, Instance, InstanceStatus, Snapshot
from busreg.wire.routing import partition_for

__version__ = "0.1.0"

__all__ = [
    "AuthenticationFailed",
    "BusregError",
    "Change",
    "ClientSettings",
    "ClosedError",
    "ConfigurationError",
    "ConnectionFailed",
    "Delta",
    "DeltaKind",
    "Fenced",
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
    "TopologyMissing",
    "Worker",
    "WorkerSettings",
    "ZoneAware",
    "__version__",
    "partition_for",
]
