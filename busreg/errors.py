"""Exceptions raised by busreg.

Broker and Redis errors are mapped to these at one boundary (``busreg.transport.connections``), so
aio-pika, aiormq, rstream and redis exception types never reach callers::

    BusregError
    ├── ConfigurationError        bad settings, URL or argument
    ├── InvalidEvent              an event failed validation (carries .reason)
    ├── ConnectionFailed          a broker or Redis cannot be reached / refused us
    │   └── AuthenticationFailed  wrong credentials or missing permissions
    ├── TopologyMissing           the namespace's streams/exchanges are not declared
    │   └── PartitionMismatch     workers/clients and topology disagree on P
    ├── PublishFailed             the broker did not confirm a publish in time
    ├── RequestTimeout            no worker answered a snapshot/list request in time
    ├── Fenced                    a worker lost partition ownership; its write was refused
    ├── NoInstanceAvailable       no instance of a service can be chosen (load balancer)
    └── ClosedError               the object was closed and cannot be reopened
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "BusregError",
    "ClosedError",
    "ConfigurationError",
    "ConnectionFailed",
    "Fenced",
    "InvalidEvent",
    "NoInstanceAvailable",
    "PartitionMismatch",
    "PublishFailed",
    "RequestTimeout",
    "TopologyMissing",
]


class BusregError(Exception):
    """Base class of every error busreg raises."""


class ConfigurationError(BusregError):
    """Settings, URLs or arguments are invalid."""


class InvalidEvent(BusregError):
    """An ingest event cannot be applied; ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ConnectionFailed(BusregError):
    """RabbitMQ or Redis could not be reached, or dropped the connection."""


class AuthenticationFailed(ConnectionFailed):
    """The server refused our credentials or permissions."""


class TopologyMissing(BusregError):
    """The namespace's topology is absent: run ``busreg topology apply``."""


class PartitionMismatch(TopologyMissing):
    """The configured partition count differs from the declared super stream."""


class PublishFailed(BusregError):
    """A publish was not confirmed by the broker."""


class RequestTimeout(BusregError):
    """No worker answered a request in time (is a worker running?)."""


class Fenced(BusregError):
    """This worker no longer owns the partition; nothing was written."""


class NoInstanceAvailable(BusregError):
    """No instance of a service can be chosen (none registered, none UP, none matching)."""


class ClosedError(BusregError):
    """The object is closed; create a new one."""
