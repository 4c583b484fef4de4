"""A cheap load generator: many simulated instances from one process.

Every simulated instance is a pre-encoded Heartbeat (the bytes ``busreg.wire.codec.encode_event``
writes, split around ``seq``), so one heartbeat costs a bytes join plus rstream's own
per-message work. Messages go to the partition streams with ``Producer.send_batch`` and
publisher confirms are counted by callback; nothing sleeps per instance.

    load = HeartbeatLoad(settings, services=100, ttl=3.0)
    load.resize(10_000)            # instances 0..9999, one heartbeat each per second
    async with load.running(producer):
        ...                        # load.sent / load.confirmed move
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from busreg import constants as c
from busreg.settings import Settings
from busreg.wire.codec import encode_event
from busreg.wire.models import Heartbeat
from busreg.wire.routing import partition_for

__all__ = ["HeartbeatLoad", "blast", "instance_template"]

log = logging.getLogger("busreg.bench")

#: a seq no real heartbeat has: the template is split around it
_MARK = 987_654_321_987_654
#: the pacer's period: every TICK seconds it sends what the schedule says is due
TICK = 0.01
#: most unconfirmed messages in flight before the generator waits (it is then the broker,
#: not the generator, that sets the pace; reported as ``throttled``)
MAX_INFLIGHT = 60_000


def service_name(j: int) -> str:
    return f"svc-{j:04d}"


def instance_template(
    i: int, services: int, incarnation: int, ttl: float, prefix: str = "i"
) -> tuple[str, bytes, bytes]:
    """(service, bytes before the seq digits, bytes after) of simulated instance ``i``."""
    service = service_name(i % services)
    event = {
        "v": 1,
        "service": service,
        "instance_id": f"{service}-{prefix}{i:07d}",
        "incarnation": incarnation,
        "seq": _MARK,
        "address": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:8080",
        "zone": f"zone-{i % 3}",
        "status": "UP",
        "metadata": {"version": "1.4.2", "team": "bench"},
        "ttl": ttl,
        "type": "heartbeat",
    }
    body = orjson.dumps(event)
    before, after = body.split(b"%d" % _MARK)
    return service, before, after


def check_template(services: int, ttl: float) -> int:
    """Assert the template encodes exactly what ``encode_event(Heartbeat(...))`` does;
    returns the size of one heartbeat in bytes."""
    inc = time.time_ns()
    service, before, after = instance_template(7, services, inc, ttl)
    ours = before + b"%d" % 12345 + after
    model = Heartbeat.model_validate_json(ours)
    assert model.seq == 12345
    assert model.service == service
    assert encode_event(model) == ours, "bench heartbeat template drifted from encode_event"
    return len(ours)


class HeartbeatLoad:
    """``n`` simulated instances heartbeating once per ``interval`` seconds each."""

    def __init__(
        self,
        settings: Settings,
        *,
        services: int,
        ttl: float,
        interval: float = 1.0,
        prefix: str = "i",
        per_message: int = 1,
    ) -> None:
        self.settings = settings
        #: heartbeats per message: above 1, a partition's heartbeats go out as batched
        #: heartbeat events (contract v2) of this many items, as a Registry sends them
        self.per_message = per_message
        self.services = services
        self.ttl = ttl
        self.interval = interval
        self.prefix = prefix
        self.incarnation = time.time_ns()
        self._parts: list[int] = []
        self._before: list[bytes] = []
        self._after: list[bytes] = []
        self._service_part: dict[str, int] = {}
        self._streams = [
            c.ingest_partition(settings.namespace, k) for k in range(settings.partitions)
        ]
        self.active = 0
        self.seq = 0
        self.sent = 0
        self.confirmed = 0
        self.failed = 0
        self.throttled = 0
        self.behind = 0
        self.sent_by_partition = [0] * settings.partitions
        #: instances that no longer heartbeat (simulated crash)
        self.stopped: set[int] = set()
        #: instances whose heartbeats are sent one per batch so their confirm time is known
        self.tracked: set[int] = set()
        self.last_confirm: dict[int, float] = {}
        self._callbacks = [functools.partial(self._on_confirm, k) for k in self._streams_range()]
        self._item_callbacks: dict[int, Any] = {}
        self._cursor = 0
        self._confirm_waiters: list[tuple[int, asyncio.Future[None]]] = []

    def _streams_range(self) -> range:
        return range(self.settings.partitions)

    # --- instances ------------------------------------------------------------------------

    def resize(self, n: int) -> None:
        """Simulate instances 0..n-1 (templates are built once, on first use)."""
        while len(self._before) < n:
            i = len(self._before)
            service, before, after = instance_template(
                i, self.services, self.incarnation, self.ttl, self.prefix
            )
            k = self._service_part.get(service)
            if k is None:
                k = self._service_part[service] = partition_for(service, self.settings.partitions)
            self._parts.append(k)
            self._before.append(before)
            self._after.append(after)
        self.active = n

    def instance_id(self, i: int) -> str:
        service = service_name(i % self.services)
        return f"{service}-{self.prefix}{i:07d}"

    def service_of(self, i: int) -> str:
        return service_name(i % self.services)

    # --- confirms ---------------------------------------------------------------------------

    def _on_confirm(self, k: int, status: Any) -> None:
        if status.is_confirmed:
            self.confirmed += 1
        else:
            self.failed += 1
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        if self._confirm_waiters:
            done = self.confirmed + self.failed
            for target, fut in self._confirm_waiters:
                if done >= target and not fut.done():
                    fut.set_result(None)

    def _on_confirm_items(self, n: int, status: Any) -> None:
        # one batched message: n heartbeats confirmed (or failed) at once
        if status.is_confirmed:
            self.confirmed += n
        else:
            self.failed += n
        self._wake_waiters()

    async def _send_batched(self, producer: Any, k: int, bodies: list[bytes]) -> None:
        from rstream import RawMessage

        m = self.per_message
        messages: dict[int, list[Any]] = {}
        for i in range(0, len(bodies), m):
            chunk = bodies[i : i + m]
            items = b",".join(orjson.dumps(b.decode()) for b in chunk)
            body = b'{"v":2,"type":"heartbeats","items":[' + items + b"]}"
            messages.setdefault(len(chunk), []).append(RawMessage(body))
        for n, group in messages.items():
            callback = self._item_callbacks.get(n)
            if callback is None:
                callback = self._item_callbacks[n] = functools.partial(self._on_confirm_items, n)
            await producer.send_batch(self._streams[k], group, on_publish_confirm=callback)

    def _on_tracked_confirm(self, k: int, i: int, status: Any) -> None:
        # one callback object per tracked message: rstream registers it before the frame
        # is written, so the confirm can never race the bookkeeping
        if status.is_confirmed:
            self.last_confirm[i] = time.perf_counter()
        self._on_confirm(k, status)

    async def wait_confirmed(self, timeout: float = 30.0, in_flight: int = 0) -> bool:
        """Wait until at most ``in_flight`` of the messages sent so far are unconfirmed."""
        target = self.sent - in_flight
        if self.confirmed + self.failed >= target:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (target, fut)
        self._confirm_waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await fut
            return True
        except TimeoutError:
            return False
        finally:
            self._confirm_waiters.remove(entry)

    # --- sending ----------------------------------------------------------------------------

    async def send_slice(self, producer: Any, count: int) -> int:
        """Send the next ``count`` heartbeats in instance order (cyclic); returns sent."""
        n = self.active
        if n == 0 or count <= 0:
            return 0
        buckets: list[list[bytes]] = [[] for _ in self._streams]
        single: list[tuple[int, bytes]] = []
        before, after, parts = self._before, self._after, self._parts
        stopped, tracked = self.stopped, self.tracked
        cursor = self._cursor
        seq = self.seq
        for _ in range(count):
            i = cursor
            cursor += 1
            if cursor >= n:
                cursor = 0
            if i in stopped:
                continue
            seq += 1
            body = before[i] + b"%d" % seq + after[i]
            if i in tracked:
                single.append((i, body))
            else:
                buckets[parts[i]].append(body)
        self._cursor = cursor
        self.seq = seq
        sent = 0
        for k, batch in enumerate(buckets):
            if batch and self.per_message > 1:
                await self._send_batched(producer, k, batch)
            elif batch:
                await producer.send_batch(
                    self._streams[k], batch, on_publish_confirm=self._callbacks[k]
                )
            sent += len(batch)
            self.sent_by_partition[k] += len(batch)
        for i, body in single:
            k = parts[i]
            await producer.send_batch(
                self._streams[k],
                [body],
                on_publish_confirm=functools.partial(self._on_tracked_confirm, k, i),
            )
            sent += 1
            self.sent_by_partition[k] += 1
        self.sent += sent
        return sent

    async def send_rounds(self, producer: Any, rounds: int, batch: int = 2_000) -> float:
        """Send ``rounds`` heartbeats per active instance as fast as confirms allow;
        returns the seconds it took until all were confirmed."""
        t0 = time.perf_counter()
        total = rounds * self.active
        done = 0
        while done < total:
            await self.wait_confirmed(60, in_flight=MAX_INFLIGHT // 2)
            step = min(batch, total - done)
            await self.send_slice(producer, step)
            done += step
        await self.wait_confirmed(60)
        return time.perf_counter() - t0

    async def run(self, producer: Any) -> None:
        """Paced: ``active / interval`` heartbeats per second, until cancelled."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        owed = 0.0
        last = start
        while True:
            await asyncio.sleep(TICK)
            now = loop.time()
            owed += (now - last) * self.active / self.interval
            last = now
            if owed > self.active / self.interval * 0.5:
                # stalled for half a period: do not burst to catch up (real instances
                # would not either); count what was skipped
                self.behind += int(owed - self.active / self.interval * 0.1)
                owed = self.active / self.interval * 0.1
            if self.sent - self.confirmed - self.failed > MAX_INFLIGHT:
                self.throttled += 1
                continue
            count = int(owed)
            if count:
                owed -= count
                await self.send_slice(producer, count)

    @contextlib.asynccontextmanager
    async def running(self, producer: Any) -> AsyncIterator[HeartbeatLoad]:
        task = asyncio.create_task(self.run(producer), name="bench-loadgen")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if not task.cancelled() and task.exception() is not None:
                log.warning("bench: load generator failed: %r", task.exception())


async def blast(producer: Any, stream: str, body: bytes, count: int, batch: int = 500) -> float:
    """Raw publish rate with confirms: ``count`` copies of ``body`` to ``stream`` in batches,
    at most MAX_INFLIGHT unconfirmed; returns messages/s until the last confirm."""
    confirmed = 0
    sent = 0
    limit = MAX_INFLIGHT // 3
    done = asyncio.Event()
    room = asyncio.Event()
    room.set()

    def on_confirm(status: Any) -> None:
        nonlocal confirmed
        confirmed += 1
        if sent - confirmed <= limit:
            room.set()
        if confirmed >= count:
            done.set()

    t0 = time.perf_counter()
    while sent < count:
        if sent - confirmed > limit:
            room.clear()
            await room.wait()
        n = min(batch, count - sent)
        await producer.send_batch(stream, [body] * n, on_publish_confirm=on_confirm)
        sent += n
    async with asyncio.timeout(60):
        await done.wait()
    return count / (time.perf_counter() - t0)
