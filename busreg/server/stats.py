"""Counters of partition runners and of a worker, kept in memory and read at scrape time.

Nothing here does I/O: runners bump plain ints per batch, ``busreg status`` and the
metrics collector read them. ``PartitionStats.add`` sums the runners a worker had for one
partition, so metrics stay monotonic across handovers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["COUNTERS", "HOPS", "PartitionStats", "WorkerStatus"]

#: The hops of a batch with deltas inside the worker, in order (hop, what it measures):
HOPS = (
    ("deliver", "the batch's newest event: its broker timestamp (ms resolution) to here"),
    ("queue", "its delivery to the apply call (decoding, the previous apply)"),
    ("apply", "the apply.lua round trip"),
    ("handoff", "apply done to the delta publish starting"),
    ("confirm", "the delta publish to the broker's confirm (not on a watcher's way)"),
)

#: The monotonic counters of PartitionStats (attribute, metric suffix, help text).
COUNTERS = (
    (
        "applied",
        "events_applied",
        "Events that changed or renewed state (register, heartbeat, "
        "deregister newer than what was known).",
    ),
    ("stale", "events_stale", "Events older than what was already applied (ignored)."),
    (
        "replayed",
        "events_replayed",
        "Events at or below the committed offset, read again after "
        "a takeover or reconnect (skipped).",
    ),
    (
        "expired",
        "instances_expired",
        "Instances expired (no heartbeat within their TTL, measured against the watermark).",
    ),
    ("published", "deltas_published", "Deltas published to service exchanges and confirmed."),
    ("batches", "apply_batches", "Atomic apply calls (one Lua script per batch)."),
    (
        "ticks",
        "ticks_written",
        "Ticks the owner wrote into its quiet partition (a lease falling due, the outage "
        "logic, or a probe of the subscription).",
    ),
)


@dataclass
class PartitionStats:
    """Counters of one runner, read by ``busreg status`` and the metrics endpoint."""

    applied: int = 0
    stale: int = 0
    replayed: int = 0
    expired: int = 0
    dead_lettered: int = 0
    dead_by_reason: dict[str, int] = field(default_factory=dict)
    published: int = 0
    batches: int = 0
    ticks: int = 0
    #: seconds spent in each hop by the batches that produced deltas (see HOPS), and how
    #: many such batches: a register's way to its watchers, inside the worker
    hop_seconds: dict[str, float] = field(default_factory=dict)
    delta_batches: int = 0
    offset: int = -1
    outbox: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, other: PartitionStats) -> None:
        """Add ``other``'s counters into these (offset and outbox are not counters)."""
        for attr, _, _ in COUNTERS:
            setattr(self, attr, getattr(self, attr) + getattr(other, attr))
        self.dead_lettered += other.dead_lettered
        self.delta_batches += other.delta_batches
        for hop, seconds in list(other.hop_seconds.items()):
            self.hop_seconds[hop] = self.hop_seconds.get(hop, 0.0) + seconds
        for reason, n in list(other.dead_by_reason.items()):
            self.dead_by_reason[reason] = self.dead_by_reason.get(reason, 0) + n


@dataclass(frozen=True)
class WorkerStatus:
    """What one worker knows right now: its id, the live workers, its runners' counters."""

    worker_id: str
    live_workers: list[str]
    owned: dict[int, PartitionStats]
