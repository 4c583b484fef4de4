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
from busreg.server.store import LiveSet, PartitionStore
from busreg.settings import Settings

__all__ = ["Membership", "Owned"]

log = logging.getLogger("busreg.worker")
T = TypeVar("T")

#: A round is also made this long after a peer's membership deadline (Redis ms), so a
#: SIGKILLed peer's partitions are taken as soon as its leases lapse, not up to a round later.
PEER_EXPIRY_MARGIN = 0.01


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
    """Every ``lease_ttl / 3``: refresh this worker in the live set, read it, and renew every
    lease in ``owned`` (the worker's own dict, read each round), side by side.

    Rounds come sooner when a peer's membership is about to lapse (its partitions become
    free then) and on ``poke()`` (a peer's notice that it left). Each round also reads
    which partitions have live leases (``busy``: standby workers tick only those)."""

    def __init__(
        self, settings: Settings, store: PartitionStore, worker_id: str, owned: dict[int, Owned]
    ) -> None:
        self._settings = settings
        self._store = store
        self._worker_id = worker_id
        self._owned = owned
        #: the live workers, sorted, as of the last successful round
        self.live: list[str] = []
        #: partitions with live leases, as of the last successful round
        self.busy: frozenset[int] = frozenset()
        #: set by the first successful round: assignment needs the live set
        self.joined = asyncio.Event()
        #: set after every successful round (the worker's control loop clears it)
        self.changed = asyncio.Event()
        self._poke = asyncio.Event()
        self._left = False
        self._next_expiry: float | None = None  # loop time a peer's membership lapses

    def poke(self) -> None:
        """Make a round now (a peer left: its partitions are free)."""
        self._poke.set()

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
        while True:
            started = loop.time()
            self._poke.clear()
            errors = await self._round(lease_ms, timeout=bound)
            if errors:
                failures.failed(errors[0])  # a streak is logged once
            else:
                failures.recovered()
            wake = started + every
            if self._next_expiry is not None:
                wake = min(wake, self._next_expiry + PEER_EXPIRY_MARGIN)
            # a timer, woken early by poke() (a peer's notice), not synchronisation
            try:
                async with asyncio.timeout(max(0.0, wake - loop.time())):
                    await self._poke.wait()
            except TimeoutError:
                pass

    async def _round(self, lease_ms: int, timeout: float) -> list[BusregError]:
        """One round: heartbeat and every renewal side by side, each bounded by ``timeout``.

        Both are idempotent (a lost reply leaves membership or the lease refreshed, which
        is what a retry would do), so a failed one is simply made again next round."""
        store = self._store
        owned = [(k, o) for k, o in self._owned.items() if not o.lost]

        async def bounded(what: str, call: Awaitable[T]) -> T:
            try:
                async with asyncio.timeout(timeout):
                    return await call
            except TimeoutError as exc:
                raise ConnectionFailed(f"{what}: no reply within {timeout:.1f}s") from exc

        leases = [o.runner.lease for _, o in owned]
        calls: list[Awaitable[Any]] = [bounded("renew", store.renew_many(leases, lease_ms))]
        left = self._left
        if not left:
            beat = store.heartbeat_worker(self._worker_id, lease_ms)
            calls.append(bounded("membership", beat))
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, BusregError):
                raise result  # a bug, or our cancellation: never swallowed
        errors: list[BusregError] = []
        if not left:
            live = results.pop()
            if isinstance(live, BusregError):
                errors.append(live)
            elif isinstance(live, LiveSet):
                self._learn(live, loop.time())
        got = results[0]
        renewals: list[Any] = [got] * len(owned) if isinstance(got, BaseException) else got
        for (k, o), renewed in zip(owned, renewals, strict=True):
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

    def _learn(self, view: LiveSet, now: float) -> None:
        self.live = view.live
        self.busy = view.busy
        peers = [d for w, d in view.deadlines.items() if w != self._worker_id]
        # Redis ms to our loop's clock, from the time of the reply (an upper bound: the
        # round trip only makes us wake a little late, never early)
        self._next_expiry = now + (min(peers) - view.now_ms) / 1000 if peers else None
        self.joined.set()
        self.changed.set()
