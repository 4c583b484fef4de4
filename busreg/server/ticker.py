"""Standby ticks: every live worker ticks the partitions it does not own.

Why: a partition's lease clock moves with the broker timestamps of what is in its stream,
and a gap longer than ``max_clock_step`` reads as an ingest outage (nobody could write),
which opens the outage grace. The owner ticks a quiet partition itself; but when the owner
dies, nobody ticks it until the next owner has the lease (``lease_ttl``) and has
subscribed, and that ownerless gap used to open the grace: a host that lost its worker and
an instance together had the instance removed ~10 s late. With standby ticks, a gap in a
partition's stream means what the grace assumes it means: no one could write to the
broker. Only partitions with live leases get them (owners record which in the live set,
``Membership``): without a lease, a gap opens no grace. They cost at most
``(W - 1) * P / standby_tick_interval`` small messages a second, and nothing when idle.

The worker makes one round before it joins the live set (``Worker._serve``): declaring a
stream's publisher costs a round trip per partition on first use, and a worker that has just
joined can be the only one left a moment later.

A tick changes no state, so it needs no lease: the owner applies it like any tick (it only
moves the watermark), and a tick a second worker writes twice is harmless.

Outage marks (``OutageMarks``): the watermark assumes that whoever can write to a stream,
everyone can. A stream whose leader moves breaks that for a while: writers find the new
leader one by one, and a worker's ticks (ten a second, retried at once) get there before
registrants' heartbeats (one a second, a failed one retried a quarter interval later).
Measured on the 3-node cluster, a rolling restart kept heartbeats of some streams out for
2.5-3.5 s while ticks moved the clock, and 22-82 instances expired in 3 of 7 runs. So a
worker that loses its way to a stream (its publisher's connection closed or went silent, its
subscription got a metadata update) writes an outage mark into it, and the owner opens the
outage grace there (apply.lua): a crash close to a leader move is detected up to
``outage_grace`` later, and no healthy instance expires while writers re-locate the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable

import orjson

from busreg import constants as c
from busreg.backoff import RetryLog
from busreg.errors import BusregError
from busreg.settings import Settings
from busreg.transport.streams import StreamWriter
from busreg.wire.auth import sign, worker_key
from busreg.wire.codec import encode_event
from busreg.wire.models import Tick

__all__ = ["OutageMarks", "StandbyTicker"]

log = logging.getLogger("busreg.worker")


class StandbyTicker:
    """Ticks, every ``worker.standby_tick_interval``, each partition ``wanted()`` names
    (the worker's: those it does not tick as owner and that have live leases: a partition
    without any needs no tick, see tickplan.py)."""

    def __init__(
        self,
        settings: Settings,
        writer: StreamWriter,
        worker_id: str,
        wanted: Callable[[], Collection[int]],
    ) -> None:
        self._settings = settings
        self._writer = writer
        self._wanted = wanted
        self._tick = orjson.dumps(Tick(worker=worker_id).model_dump())
        self._failures = RetryLog(log, f"standby ticks of {worker_id}")

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set."""
        interval = self._settings.worker.standby_tick_interval
        while not stop.is_set():
            # a periodic timer, not synchronisation: wake at the tick rate or on stop
            try:
                async with asyncio.timeout(interval):
                    await stop.wait()
                return
            except TimeoutError:
                pass
            await self.tick_once(timeout=interval)

    async def tick_once(self, timeout: float) -> None:
        """One round: a tick into every partition ``wanted()`` names, concurrently."""
        ns = self._settings.namespace
        streams = [c.ingest_partition(ns, k) for k in sorted(self._wanted())]
        if not streams:
            return
        results = await asyncio.gather(
            *(self._writer.send(s, self._tick, timeout=timeout) for s in streams),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, BusregError):
                raise error  # a bug, or a cancellation: never swallowed
        if errors:
            self._failures.failed(errors[0])  # a streak is logged once
        else:
            self._failures.recovered()


class OutageMarks:
    """Writes an outage mark into each stream ``note`` is told of, until one is confirmed.

    One mark per disruption: notes for a stream marked less than half a grace ago are
    dropped (one leader move closes connections, silences sends and updates metadata, all
    at once). A mark that cannot be written for a whole ``outage_grace`` is given up: the
    stream took nothing meanwhile, and the gap in its clock opens the grace by itself."""

    def __init__(self, settings: Settings, writer: StreamWriter, worker_id: str) -> None:
        self._settings = settings
        self._writer = writer
        body = encode_event(Tick(worker=worker_id, outage=True))
        secret = settings.auth.secret_bytes()
        self._mark = body if secret is None else sign(worker_key(secret), body)
        self._pending: dict[str, float] = {}  # stream -> when first noted (monotonic)
        self._marked: dict[str, float] = {}  # stream -> when a mark was last confirmed
        self._wake = asyncio.Event()
        self._failures = RetryLog(log, f"outage marks of {worker_id}")
        #: marks confirmed by the broker (worker metrics and tests)
        self.written = 0

    def note(self, streams: Iterable[str]) -> None:
        """Mark ``streams`` soon (cheap, never blocks: called from rstream callbacks)."""
        now = time.monotonic()
        recent = self._settings.worker.outage_grace / 2
        for stream in streams:
            if stream in self._pending or now - self._marked.get(stream, -recent) < recent:
                continue
            self._pending[stream] = now
            log.info("lost the way to %s: marking an outage there (expiry waits)", stream)
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Write pending marks until ``stop`` is set; retried at the standby tick rate."""
        retry = self._settings.worker.standby_tick_interval
        while not stop.is_set():
            # woken by note() at once; otherwise a periodic timer, to see stop and to retry
            # marks that failed
            try:
                async with asyncio.timeout(retry):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._pending and not stop.is_set():
                await self._write_pending()

    async def _write_pending(self) -> None:
        streams = list(self._pending)
        results = await asyncio.gather(
            *(self._writer.send(s, self._mark, timeout=c.OUTAGE_MARK_TIMEOUT) for s in streams),
            return_exceptions=True,
        )
        now = time.monotonic()
        failed: BaseException | None = None
        for stream, result in zip(streams, results, strict=True):
            if result is None:
                del self._pending[stream]
                self._marked[stream] = now
                self.written += 1
            elif not isinstance(result, BusregError):
                raise result  # a bug, or a cancellation: never swallowed
            else:
                failed = result
                if now - self._pending[stream] > self._settings.worker.outage_grace:
                    del self._pending[stream]  # the stream's own clock gap opens the grace
        if failed is not None:
            self._failures.failed(failed)
        else:
            self._failures.recovered()
