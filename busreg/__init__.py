"""busreg: a service registry on RabbitMQ streams and Redis.

Public surface (guarded by a test): everything a user imports comes from here.
"""

from .balancer import RoundRobin, ZoneAware
from .client import Registry
from .errors import (
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
from .ingest import Registration
from .models import Delta, DeltaKind, Instance, InstanceStatus, Snapshot
from .partitioning import partition_for
from .retry import RetryBudget, RetryPolicy
from .revisions import Change
from .settings import ClientSettings, Settings, WorkerSettings
from .view import ServiceView
from .worker import Worker

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
