"""One owned partition: consume its stream, apply batches atomically, drain the outbox.

A ``PartitionRunner`` lives exactly as long as its worker holds the partition's lease.
Three loops run under one TaskGroup:

* apply: take what the stream callback buffered, encode it for ``apply.lua`` (bad events
  become dead letters in the same atomic step) and commit state + offset + outbox together;
* drain: publish outbox entries in order with publisher confirms, then trim them;
* tick: write a tick into the partition when it has been quiet long enough that a lease
  falls due or a gap would read as an outage (``TickPlan``), which moves the watermark that
  expiry is measured against (invariant 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import orjson

from busreg import constants as c
from busreg.backoff import Backoff, retrying
from busreg.errors import BusregError, ConnectionFailed, Fenced
from busreg.server.encoding import BatchEncoder
from busreg.server.publisher import DeltaPublisher
from busreg.server.stats import PartitionStats
from busreg.server.store import ApplyResult, Lease, PartitionStore
from busreg.server.tickplan import TickPlan
from busreg.settings import Settings
from busreg.transport.connections import translate_stream
from busreg.transport.streams import StreamWriter, peek_heads
from busreg.wire.models import Tick

__all__ = ["PartitionRunner", "take_fresh"]

log = logging.getLogger("busreg.worker")
T = TypeVar("T")

SEP = c.FIELD_SEPARATOR
#: Applied batches whose outbox entries a runner holds for its drain loop; past this the
#: drain is behind (a slow broker), and it reads the outbox instead (memory stays bounded).
FRESH_MAX = 64


def take_fresh(
    fresh: deque[tuple[int, tuple[bytes, ...]]], upto: int, limit: int
) -> tuple[int, list[bytes]] | None:
    """From ``fresh`` ((number of the first, entries) of applied batches, in order), the
    entries that start exactly at number ``upto``, at most ``limit``; None when there are
    none or it cannot tell (then the outbox is read: it holds the same entries).

    >>> fresh = deque([(0, (b"a", b"b")), (2, (b"c",))])
    >>> take_fresh(fresh, 1, 10), list(fresh)
    ((1, [b'b', b'c']), [])
    """
    while fresh and fresh[0][0] + len(fresh[0][1]) <= upto:
        fresh.popleft()  # published already (read back from the outbox)
    if upto < 0 or not fresh or fresh[0][0] > upto:
        fresh.clear()  # where the outbox stands is not known, or a gap: read it
        return None
    first, entries = fresh.popleft()
    out = list(entries[upto - first :])
    while fresh and len(out) < limit and fresh[0][0] == upto + len(out):
        out += fresh.popleft()[1]
    if len(out) > limit:  # the rest stays for the next round
        fresh.appendleft((upto + limit, tuple(out[limit:])))
        del out[limit:]
    return upto, out


#: What every heartbeat's body holds (a batch's too: "heartbeats"), signed or not, raw JSON or
#: in an AMQP 1.0 message; a registration, deregistration, override or tick never does.
HEARTBEAT = b'"type":"heartbeat'
#: How long heartbeats that change nothing visible may wait for others to join their apply
#: batch. Short against a TTL (seconds) and the tick margin; registrations never wait.
COALESCE_WINDOW = 0.01

#: apply.lua's ops that register or renew an instance (a register/heartbeat, a batch's item)
UPSERTS = frozenset(("U", "u"))


class PartitionRunner:
    def __init__(
        self,
        lease: Lease,
        settings: Settings,
        store: PartitionStore,
        connect: Callable[[], Awaitable[Any]],
        ticks: StreamWriter,
        worker_id: str,
    ) -> None:
        self.lease = lease
        self.partition = lease.partition
        self.settings = settings
        self.store = store
        self.stats = PartitionStats(offset=lease.offset)
        # this partition's own stream connection, opened by run() (the worker closes it):
        # connecting here, not in the worker's control loop, keeps a slow or stalled
        # connect from holding up the worker's leases and its other partitions
        self._connect = connect
        self.consumer: Any = None
        self._ticks = ticks
        # deltas go out on this runner's own AMQP connection (see DeltaPublisher)
        self._publisher = DeltaPublisher(settings, self.partition, worker_id, self.stats)
        self._stream = c.ingest_partition(settings.namespace, self.partition)
        self._tick = orjson.dumps(Tick(worker=worker_id).model_dump())
        self._buf: list[tuple[int, int, bytes]] = []
        self._has_data = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._outbox_wake = asyncio.Event()
        #: partition-clock ms until a tick is needed, from the last apply (None: unknown)
        self.due_ms: int | None = None
        self._reschedule = asyncio.Event()
        #: set while the buffer holds something that must not wait (see _coalesce)
        self._urgent = asyncio.Event()
        #: the hops of the last applied batch with deltas, and when its apply came back,
        #: until the drain has published them (stats.HOPS)
        self._hops_pending: tuple[dict[str, float], float] | None = None
        self._first_arrival = 0.0
        #: (number of the first, entries) of what applies appended, until published
        self._fresh: deque[tuple[int, tuple[bytes, ...]]] = deque()
        #: the partition's busy flag as this runner last wrote it (None: not yet)
        self._flagged: bool | None = None
        self._stopping = asyncio.Event()
        self._applied_all = asyncio.Event()
        self._last_delivery = 0.0
        #: True while this runner's tick loop runs (see StandbyTicker)
        self.ticking = False
        self._subscriber_id: int | None = None
        #: head of the stream when a partition without committed offset was taken (-1: none)
        self._rebuild_until = -1
        self._failure: BusregError | None = None
        self._encoder = BatchEncoder(settings, self.partition, self.stats)

    @property
    def stream(self) -> str:
        return self._stream

    # --- stream callback ------------------------------------------------------------------

    async def _on_message(self, body: bytes, ctx: Any) -> None:
        if self._stopping.is_set():
            return  # handing over: the next owner reads it from the committed offset
        if not self._buf:
            self._first_arrival = time.monotonic()
        self._buf.append((ctx.offset, ctx.timestamp, body))
        self._last_delivery = time.monotonic()
        if HEARTBEAT not in body:
            self._urgent.set()  # a registration, a deregistration or a tick: no waiting
        self._has_data.set()
        if len(self._buf) >= self.settings.worker.buffer_max:
            # backpressure: block the stream reader (no more credit) until applied
            self._space.clear()
            await self._space.wait()

    async def _subscribe(self) -> None:
        from rstream import ConsumerOffsetSpecification, OffsetType

        if self.lease.offset >= 0:
            spec = ConsumerOffsetSpecification(OffsetType.OFFSET, self.lease.offset + 1)
        else:
            # no committed offset: rebuild from the recent past (heartbeats carry everything),
            # quietly up to where the stream ends now (apply.lua, "Rebuild")
            heads = await peek_heads(self.consumer, self.settings, [self.partition])
            self._rebuild_until = heads[self.partition]
            since = int((time.time() - self.settings.worker.replay_window) * 1000)
            spec = ConsumerOffsetSpecification(OffsetType.TIMESTAMP, since)
        self._last_delivery = time.monotonic()  # the silence watchdog counts from here
        with translate_stream(f"subscribe {self._stream}"):
            async with asyncio.timeout(c.WORKER_BROKER_TIMEOUT):
                self._subscriber_id = await self.consumer.subscribe(
                    self._stream, self._on_message, offset_specification=spec, initial_credit=20
                )

    def fail(self, error: BusregError) -> None:
        """End this runner with ``error`` (e.g. its stream connection closed): the worker
        releases the partition and takes it again, resubscribing from the committed offset
        (what was buffered but not committed is read again; the script skips duplicates)."""
        if self._failure is None:
            self._failure = error
        self._subscriber_id = None  # the broker already dropped the subscription
        self._has_data.set()
        self._outbox_wake.set()

    # --- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Graceful: stop consuming, apply what is buffered, drain the outbox, return."""
        self._stopping.set()
        self._reschedule.set()
        self._urgent.set()  # a coalescing wait ends
        self._has_data.set()
        self._outbox_wake.set()
        self._space.set()  # a stream callback blocked on backpressure returns (and drops)

    async def run(self) -> None:
        """Run until stopped (returns) or fenced (raises Fenced)."""
        try:
            self.consumer = await self._connect()
            await self._drain_once_all()  # entries a previous owner committed but never sent
            await self._subscribe()
            if self.lease.offset < 0:
                # a partition taken without committed offset is marked for a rebuild; tell
                # the script at once how far it reaches (or that nothing is to be replayed),
                # so snapshots are refused only while history is really being replayed
                await self._retrying("rebuild mark", self._mark_rebuild)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._apply_loop(), name=f"apply-{self.partition}")
                tg.create_task(self._drain_loop(), name=f"drain-{self.partition}")
                tg.create_task(self._tick_loop(), name=f"tick-{self.partition}")
        except* BusregError as group:
            # surface one plain error (Fenced first) so the worker can tell fencing from
            # a failure; both end this runner and free the partition
            fenced = [e for e in group.exceptions if isinstance(e, Fenced)]
            raise (fenced or group.exceptions)[0] from None
        finally:
            # no unsubscribe round trip: deliveries after stop() are dropped, and the
            # worker closes this partition's connection once the lease is released
            self._subscriber_id = None
            await self._publisher.close()

    # --- apply ------------------------------------------------------------------------------

    def _limits(self) -> tuple[int, int, int]:
        wcfg = self.settings.worker
        return (
            int(wcfg.max_clock_step * 1000),
            int(wcfg.tombstone_ttl * 1000),
            int(wcfg.outage_grace * 1000),
        )

    async def _mark_rebuild(self) -> ApplyResult:
        return await self.store.apply(
            self.lease, [], *self._limits(), rebuild_until=self._rebuild_until
        )

    async def _apply_loop(self) -> None:
        wcfg = self.settings.worker
        limits = self._limits()
        # One batch is in Redis while the next is decoded: decoding is most of the worker's
        # CPU, and this overlaps it with the script's round trip. Batches still commit in
        # order: batch n+1 is sent only after batch n's result came back.
        inflight: asyncio.Future[ApplyResult] | None = None
        timing: tuple[float, float, float] = (0.0, 0.0, 0.0)  # deliver, queue, apply start

        async def finish() -> None:
            nonlocal inflight
            if inflight is not None:
                pending, inflight = inflight, None
                result = await pending
                self._record(result)
                if result.entries:
                    deliver, queue, started = timing
                    now = time.monotonic()
                    hops = {"deliver": deliver, "queue": queue, "apply": now - started}
                    self._hops_pending = (hops, now)
                    self._fresh.append((result.first_entry, result.entries))
                    if len(self._fresh) > FRESH_MAX:
                        self._fresh.clear()  # the drain is behind: it reads the outbox
                if result.due >= 0 and self._flagged is not True:
                    await self._flag_busy(True)  # leases a previous owner left
                if result.outbox:
                    # whenever entries wait, not only when this batch added some: a
                    # replayed batch after a takeover commits nothing new, yet the previous
                    # owner's entries may still be there
                    self._outbox_wake.set()

        try:
            while True:
                if inflight is not None and not self._buf:
                    await finish()  # nothing to decode meanwhile: collect the result
                    continue
                await self._has_data.wait()
                if self._failure is not None:
                    raise self._failure
                if not self._buf:
                    self._has_data.clear()
                    if self._stopping.is_set():
                        await finish()
                        self._applied_all.set()
                        self._outbox_wake.set()
                        return
                    continue
                if inflight is None:
                    await self._coalesce()
                batch = self._buf[: wcfg.batch_max]
                del self._buf[: wcfg.batch_max]
                # the batch's newest event is the one a watcher waits for (a registration
                # cuts a coalescing wait short): its arrival, or near it if the batch was cut
                arrived = self._first_arrival if self._buf else self._last_delivery
                if not self._buf:
                    self._urgent.clear()  # nothing urgent is left waiting
                if not self._buf and not self._stopping.is_set():
                    # (never once stopping: stop() may have come while we coalesced, and
                    # its wake-up is what ends this loop)
                    self._has_data.clear()
                else:
                    self._first_arrival = time.monotonic()  # of the rest, near enough
                if len(self._buf) < wcfg.buffer_max // 2:
                    self._space.set()
                args = self._encoder.encode(batch)
                await finish()
                if self._flagged is not True and not UPSERTS.isdisjoint(args[2::8]):
                    # flagged busy before a registration is committed (so before a watcher
                    # can see it): should this owner die then, standbys tick the partition
                    await self._flag_busy(True)
                apply = partial(
                    self.store.apply,
                    self.lease,
                    args,
                    *limits,
                    rebuild_until=self._rebuild_until,
                )
                now = time.monotonic()
                # that event's way here: broker time (ms) to its arrival, on our clock
                arrival_wall = time.time() - (now - arrived)
                timing = (max(0.0, arrival_wall - batch[-1][1] / 1000), now - arrived, now)
                # owned by this loop: awaited by finish() or cancelled below, never lost
                inflight = asyncio.ensure_future(self._retrying("apply", apply))
        finally:
            if inflight is not None:
                inflight.cancel()

    async def _coalesce(self) -> None:
        """Heartbeats that change nothing visible wait up to COALESCE_WINDOW for others to
        join their batch: one wake-up and one Redis call for many, where one apply per
        message used to cost most of the worker's CPU at low rates. Anything else in the
        buffer (a registration, a deregistration, a tick), a full batch, or a stop applies
        at once. (While an apply is in flight, batches form by themselves.)"""
        if self._urgent.is_set() or len(self._buf) >= self.settings.worker.batch_max:
            return  # (a stop sets it too)
        delay = self._first_arrival + COALESCE_WINDOW - time.monotonic()
        if delay > 0:
            # a bounded wait for more heartbeats, cut short by anything urgent
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._urgent.wait()

    async def _flag_busy(self, busy: bool) -> None:
        await self._retrying("busy flag", partial(self.store.set_busy, self.lease, busy))
        self._flagged = busy

    async def _retrying(
        self, what: str, action: Callable[[], Awaitable[T]], max_delay: float = 1.0
    ) -> T:
        """Run ``action`` until it succeeds, backing off on broker or Redis errors; a lost
        lease (Fenced) or a runner failure ends the runner instead.

        Retrying is exact everywhere it is used: an uncommitted batch is applied again (the
        script skips offsets it already has, should the first attempt have landed), outbox
        entries stay until confirmed, and a duplicate delta is dropped by subscribers."""
        return await retrying(
            action,
            what=f"partition={self.partition} {what}",
            log=log,
            backoff=Backoff(first=0.05, cap=max_delay),
            retry_on=(BusregError,),
            fatal=(Fenced,),
            stop=lambda: self._failure,
        )

    def _count_hops(self, hops: dict[str, float], handoff: float, confirm: float) -> None:
        """A batch with deltas made its way: add its hops to the stats (stats.HOPS)."""
        totals = self.stats.hop_seconds
        for hop, seconds in (*hops.items(), ("handoff", handoff), ("confirm", confirm)):
            totals[hop] = totals.get(hop, 0.0) + seconds
        self.stats.delta_batches += 1

    def _record(self, result: ApplyResult) -> None:
        s = self.stats
        s.applied += result.applied
        s.stale += result.stale
        s.replayed += result.replayed
        s.expired += result.expired
        s.offset = result.offset
        s.outbox = result.outbox
        s.batches += 1
        self.due_ms = result.due
        self._reschedule.set()

    # --- outbox -----------------------------------------------------------------------------

    async def _outbox_step(self, confirmed_upto: int) -> tuple[int, list[bytes]]:
        batch = self.settings.worker.outbox_batch
        return await self._retrying(
            "outbox read", lambda: self.store.outbox_step(self.lease, confirmed_upto, batch)
        )

    async def _drain_once_all(self) -> None:
        upto = -1
        while True:
            base, entries = await self._outbox_step(upto)
            if not entries:
                return
            await self._publish_with_retry(entries)
            upto = base + len(entries)

    async def _publish_with_retry(self, entries: list[bytes]) -> None:
        await self._retrying(
            "delta publish", lambda: self._publisher.publish(entries), max_delay=2.0
        )

    async def _drain_loop(self) -> None:
        upto = -1  # entries numbered below this are confirmed (trimmed by the next step)
        while True:
            self._outbox_wake.clear()
            # What an apply just appended goes out at once, without reading it back: one
            # Redis round trip less between commit and delta. The trim of what is confirmed
            # waits for the next outbox_step, after the publish.
            fresh = take_fresh(self._fresh, upto, self.settings.worker.outbox_batch)
            base, entries = fresh if fresh else await self._outbox_step(upto)
            if entries:
                hops, self._hops_pending = self._hops_pending, None
                started = time.monotonic()
                await self._publish_with_retry(entries)
                if hops is not None:
                    self._count_hops(hops[0], started - hops[1], time.monotonic() - started)
                upto = base + len(entries)
                continue
            if self._applied_all.is_set() or self._failure is not None:
                return
            await self._outbox_wake.wait()

    # --- watermark ticks ----------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        # while this is False (connecting, subscribing, handing over) the worker's standby
        # ticker keeps ticking the partition, so no gap opens in its stream
        self.ticking = True
        try:
            await self._ticks_until_stopped()
        finally:
            self.ticking = False

    async def _ticks_until_stopped(self) -> None:
        wcfg = self.settings.worker
        plan = TickPlan(min_spacing=wcfg.tick_interval, max_step=wcfg.max_clock_step)
        last_tick = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            delay = plan.delay(self.due_ms, now - self._last_delivery, now - last_tick)
            if delay > 0:
                # a timer, woken early by every applied batch (it may bring a lease due
                # sooner) and by stop(); not synchronisation
                self._reschedule.clear()
                try:
                    async with asyncio.timeout(delay):
                        await self._reschedule.wait()
                except TimeoutError:
                    pass
                continue
            if self.due_ms == -1 and self._flagged is not False:
                await self._flag_busy(False)  # no lease left: standbys need not tick it
            last_tick = time.monotonic()
            try:
                await self._ticks.send(
                    self._stream, self._tick, timeout=max(1.0, wcfg.tick_interval * 10)
                )
            except BusregError as exc:
                log.warning("partition=%d tick failed: %s", self.partition, exc)
                continue
            self.stats.ticks += 1
            self._check_subscription(plan.silence_limit(self.due_ms))

    def _check_subscription(self, limit: float = c.SUBSCRIPTION_SILENCE) -> None:
        """Our own ticks are confirmed, so the stream grows; if none of it has reached us
        for a while (and nothing is waiting to be applied), the subscription is dead.

        Seen on a 3-node cluster during a graceful node restart: the subscription stayed
        open and silent, no close event came, and the partition stood still for a minute
        (nothing applied, nothing expired, new registrations invisible). Failing the runner
        makes the worker take the partition again and subscribe anew."""
        silent = time.monotonic() - self._last_delivery
        if silent > limit and not self._buf and self._space.is_set():
            log.warning(
                "partition=%d: nothing delivered for %.1fs while ticks are confirmed; "
                "subscribing again",
                self.partition,
                silent,
            )
            self.fail(ConnectionFailed(f"stream subscription to {self._stream} went silent"))
