"""Renewals of many registrations in few messages (contract v2, ``Heartbeats``).

A process that holds many registrations (an app with several instances, a test fleet, the
Eureka gateway holding its clients' leases, ``busreg agent``) used to send one heartbeat
message per instance per interval. The broker's cost is per message, not per byte, so the
heartbeats of one process are sent together:

* **Aligned**: each registration beats on a grid, ``phase + k * interval``, with one random
  phase per process (``BeatGrid``), so its registrations fall due together while
  processes stay spread over the interval (no fleet-wide burst each second).
* **Batched**: heartbeats for the same partition that are sent within ``BATCH_LINGER`` of
  the first go out as one event; each item is the heartbeat exactly as it would be sent
  alone (signed with its own service's key), so workers check each by itself. A batch of
  one is sent as the plain heartbeat (v1).

Every caller gets the outcome of the publish its heartbeat was in: confirmed, or
PublishFailed (the registration retries a quarter interval later, as before). Idempotent
like any heartbeat: a batch sent twice renews twice.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Protocol

import orjson

from busreg import constants as c
from busreg.errors import PublishFailed

__all__ = ["BATCH_LINGER", "BeatGrid", "HeartbeatBatcher"]

#: How long the first heartbeat for a partition waits for others to join its batch. The
#: aligned timers of one process fire within a loop iteration or two of each other.
BATCH_LINGER = 0.002
#: Room left in a batch for the envelope (``{"v":2,"type":"heartbeats","items":[...]}``) and
#: the escaping of each item's quotes.
_ENVELOPE = 64


class Writer(Protocol):
    """What sends one confirmed message into an ingest stream (StreamWriter, AmqpWriter)."""

    async def send(self, stream: str, body: bytes, timeout: float) -> None: ...


class BeatGrid:
    """When a registration of this process heartbeats next: on ``phase + k * interval``.

    >>> grid = BeatGrid(phase=0.25)
    >>> grid.next_after(10.0, interval=1.0)
    10.25
    >>> grid.next_after(10.25, interval=1.0)
    11.25
    """

    def __init__(self, phase: float | None = None) -> None:
        #: fraction of an interval, one per process (random: processes stay spread)
        self.phase = random.random() if phase is None else phase

    def next_after(self, now: float, interval: float) -> float:
        """The first grid point after ``now`` (seconds on the loop's clock)."""
        k = math.floor(now / interval - self.phase) + 1
        return (k + self.phase) * interval


class HeartbeatBatcher:
    """Sends heartbeats (signed bodies) through ``writer``, batched per partition stream."""

    def __init__(self, writer: Writer, linger: float = BATCH_LINGER) -> None:
        self._writer = writer
        self._linger = linger
        self._pending: dict[str, list[tuple[bytes, asyncio.Future[None]]]] = {}
        #: batches and items sent (client metrics, tests)
        self.batches = 0
        self.items = 0

    async def send(self, stream: str, body: bytes, timeout: float) -> None:
        """Send ``body`` (one heartbeat) to ``stream`` in the next batch; returns once the
        broker confirmed the batch, or raises PublishFailed."""
        queue = self._pending.get(stream)
        if queue is not None:  # a batch is gathering: join it
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            queue.append((body, future))
            await future
            return
        # the first heartbeat for this stream leads the batch: it waits for the others,
        # sends, and tells each joiner the outcome
        queue = self._pending[stream] = []
        outcome: BaseException | None = None
        try:
            await asyncio.sleep(self._linger)  # a gathering window, not synchronisation
            del self._pending[stream]
            await self._send_all(stream, [body, *(b for b, _ in queue)], timeout)
        except BaseException as exc:  # told to the joiners, then raised (cancellation too)
            outcome = exc
            raise
        finally:
            if self._pending.get(stream) is queue:
                del self._pending[stream]
            for _, future in queue:
                if future.done():
                    continue
                if outcome is None:
                    future.set_result(None)
                elif isinstance(outcome, PublishFailed):
                    future.set_exception(PublishFailed(str(outcome)))
                else:  # the leader was cancelled or failed otherwise: the joiners retry
                    future.set_exception(PublishFailed(f"batch not sent: {outcome!r}"))

    async def _send_all(self, stream: str, bodies: list[bytes], timeout: float) -> None:
        send = self._writer.send
        if len(bodies) == 1:
            await send(stream, bodies[0], timeout)  # a batch of one: the plain heartbeat
            self.items += 1
            return
        for chunk in _chunks(bodies):
            event = {
                "v": c.BATCH_PROTOCOL_VERSION,
                "type": "heartbeats",
                "items": [b.decode() for b in chunk],
            }
            await send(stream, orjson.dumps(event), timeout)
            self.batches += 1
            self.items += len(chunk)


def _chunks(bodies: list[bytes]) -> list[list[bytes]]:
    """Bodies in batches within MAX_BATCH_ITEMS and MAX_BATCH_BYTES (in order)."""
    out: list[list[bytes]] = [[]]
    size = _ENVELOPE
    for body in bodies:
        # JSON-escaped: every quote of the item takes one byte more
        cost = len(body) + body.count(b'"') + 3
        if out[-1] and (len(out[-1]) >= c.MAX_BATCH_ITEMS or size + cost > c.MAX_BATCH_BYTES):
            out.append([])
            size = _ENVELOPE
        out[-1].append(body)
        size += cost
    return out
