"""Standby ticks: every live worker ticks the partitions it does not own.

Why: a partition's lease clock moves with the broker timestamps of what is in its stream,
and a gap longer than ``max_clock_step`` reads as an ingest outage (nobody could write),
which opens the outage grace. The owner ticks a quiet partition itself; but when the owner
dies, nobody ticks it until the next owner has the lease (``lease_ttl``) and has
subscribed, and that ownerless gap used to open the grace: a host that lost its worker and
an instance together had the instance removed ~10 s late. With standby ticks, a gap in a
partition's stream means what the grace assumes it means: no one could write to the
broker. They cost ``(W - 1) * P / standby_tick_interval`` small messages a second.

The worker makes one round before it joins the live set (``Worker._serve``): declaring a
stream's publisher costs a round trip per partition on first use, and a worker that has just
joined can be the only one left a moment later.

A tick changes no state, so it needs no lease: the owner applies it like any tick (it only
moves the watermark), and a tick a second worker writes twice is harmless.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection

import orjson

from busreg import constants as c
from busreg.backoff import RetryLog
from busreg.errors import BusregError
from busreg.settings import Settings
from busreg.transport.streams import StreamWriter
from busreg.wire.models import Tick

__all__ = ["StandbyTicker"]

log = logging.getLogger("busreg.worker")


class StandbyTicker:
    """Ticks, every ``worker.standby_tick_interval``, each partition ``owned()`` leaves out."""

    def __init__(
        self,
        settings: Settings,
        writer: StreamWriter,
        worker_id: str,
        owned: Callable[[], Collection[int]],
    ) -> None:
        self._settings = settings
        self._writer = writer
        self._owned = owned
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
        """One round: a tick into every partition this worker does not own, concurrently."""
        mine = set(self._owned())
        ns = self._settings.namespace
        streams = [
            c.ingest_partition(ns, k) for k in range(self._settings.partitions) if k not in mine
        ]
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
