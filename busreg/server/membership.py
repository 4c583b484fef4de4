"""A worker's membership and leases, kept fresh on a task of their own.

Membership and every lease expire after ``lease_ttl`` on Redis' clock. A worker that misses
their renewal loses all its partitions at once, so nothing else may stand in the way: the
control loop used to do membership, renewals, acquisitions and each new partition's stream
connect inline, and one stream connect that hung for 3 s let every lease lapse.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from busreg.backoff import RetryLog
from busreg.errors import BusregError, ConnectionFailed
from busreg.server.runner import PartitionRunner
from busreg.server.store import PartitionStore
from busreg.settings import Settings

__all__ = ["Membership", "Owned"]

log = logging.getLogger("busreg.worker")
T = TypeVar("T")

#: How often the live set is read (one small Lua call that also refreshes our membership).
#: It bounds how long a released partition stays unowned: a worker that leaves (SIGTERM)
#: releases its leases at once, and the others take them when they next see the live set
#: without it. Renewals of held leases go every third of the lease, not this often.
MEMBERSHIP_INTERVAL = 0.1


class Owned:
    """A partition this worker holds: its runner, the runner's task, and handover state."""

    def __init__(self, runner: PartitionRunner, task: asyncio.Task[None]) -> None:
        self.runner = runner
        self.task = task
        self.handing_over = False
        #: when a handover that has not finished by then is cut short (monotonic seconds)
        self.handover_deadline = 0.0
        self.cut_short = False
        #: the lease was lost: the task is cancelled and the entry goes when it has ended
        self.lost = False


class Membership:
    """Every ``MEMBERSHIP_INTERVAL``: refresh this worker in the live set and read it; every
    ``lease_ttl / 3`` also renew every lease in ``owned`` (the worker's own dict, read each
    round), side by side."""

    def __init__(
        self, settings: Settings, store: PartitionStore, worker_id: str, owned: dict[int, Owned]
    ) -> None:
        self._settings = settings
        self._store = store
        self._worker_id = worker_id
        self._owned = owned
        #: the live workers, sorted, as of the last successful round
        self.live: list[str] = []
        #: set by the first successful round: assignment needs the live set
        self.joined = asyncio.Event()
        self._left = False

    def leave(self) -> None:
        """Phase 1 of a stop: no more heartbeats; the leases still held are renewed, so a
        long drain is not cut short by a lease that lapsed meanwhile."""
        self._left = True

    async def run(self) -> None:
        """Rounds until cancelled."""
        lease_ttl = self._settings.worker.lease_ttl
        every = lease_ttl / 3
        # a call may take two thirds of the lease: cut shorter, a call that has to open a
        # connection to a distant Redis (4-5 round trips with redis-py 8) would be cancelled
        # every round, its connection dropped, and the next round would start over
        bound = lease_ttl * 2 / 3
        lease_ms = int(lease_ttl * 1000)
        failures = RetryLog(log, f"membership/lease renewal of {self._worker_id}")
        loop = asyncio.get_running_loop()
        poll = min(MEMBERSHIP_INTERVAL, every)
        renew_at = loop.time()
        while True:
            started = loop.time()
            renew = started >= renew_at
            if renew:
                renew_at = started + every
            errors = await self._round(lease_ms, timeout=bound, renew=renew)
            if errors:
                failures.failed(errors[0])  # a streak is logged once
            else:
                failures.recovered()
            # a periodic timer (cancelled by the worker), not synchronisation
            await asyncio.sleep(max(0.0, started + poll - loop.time()))

    async def _round(self, lease_ms: int, timeout: float, renew: bool) -> list[BusregError]:
        """One round: heartbeat and every renewal side by side, each bounded by ``timeout``.

        Both are idempotent (a lost reply leaves membership or the lease refreshed, which
        is what a retry would do), so a failed one is simply made again next round."""
        store = self._store
        owned = [(k, o) for k, o in self._owned.items() if not o.lost] if renew else []

        async def bounded(what: str, call: Awaitable[T]) -> T:
            try:
                async with asyncio.timeout(timeout):
                    return await call
            except TimeoutError as exc:
                raise ConnectionFailed(f"{what}: no reply within {timeout:.1f}s") from exc

        calls: list[Awaitable[Any]] = [
            bounded(f"renew partition {k}", store.renew(o.runner.lease, lease_ms)) for k, o in owned
        ]
        left = self._left
        if not left:
            calls.append(bounded("membership", store.heartbeat_worker(self._worker_id, lease_ms)))
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, BusregError):
                raise result  # a bug, or our cancellation: never swallowed
        errors: list[BusregError] = []
        if not left:
            live = results.pop()
            if isinstance(live, BusregError):
                errors.append(live)
            elif not isinstance(live, BaseException):
                self.live = live[1]
                self.joined.set()
        for (k, o), renewed in zip(owned, results, strict=True):
            if isinstance(renewed, BusregError):
                errors.append(renewed)  # not lost yet: the lease outlives a missed round
            elif not renewed and self._owned.get(k) is o:
                log.warning(
                    "partition fenced partition=%d worker=%s (lease lost)", k, self._worker_id
                )
                # the entry stays until the runner has ended (the worker's _run_partition),
                # so nobody here subscribes again while it is still subscribed
                o.lost = True
                o.task.cancel()
        return errors
