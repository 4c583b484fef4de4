"""One owned partition: consume its stream, apply batches atomically, drain the outbox.

A ``PartitionRunner`` lives exactly as long as its worker holds the partition's lease.
Three loops run under one TaskGroup:

* apply: take what the stream callback buffered, encode it for ``apply.lua`` (bad events
  become dead letters in the same atomic step) and commit state + offset + outbox together;
* drain: publish outbox entries in order with publisher confirms, then trim them;
* tick: write a tick into the partition whenever it has been quiet for a tick interval,
  which moves the watermark that expiry is measured against (invariant 4).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import aiormq
import orjson
from aio_pika.abc import AbstractChannel

from busreg import constants as c
from busreg.backoff import Backoff, retrying
from busreg.errors import BusregError, Fenced, InvalidEvent, PublishFailed
from busreg.server.stats import PartitionStats
from busreg.server.store import ApplyResult, Lease, PartitionStore
from busreg.settings import Settings
from busreg.transport.connections import translate, translate_stream
from busreg.transport.streams import StreamWriter
from busreg.transport.topology import declare_service_exchange
from busreg.wire.auth import Authorizer
from busreg.wire.codec import UNAUTHORISED, WRONG_PARTITION, decode_ingest, encode_stored
from busreg.wire.models import Deregister, Tick
from busreg.wire.routing import partition_for

__all__ = ["PartitionRunner"]

log = logging.getLogger("busreg.worker")
T = TypeVar("T")

SEP = c.FIELD_SEPARATOR
#: Dead letters keep at most this much of the original message: enough to see what sent it.
#: The whole message stays in the retained stream at (stream, offset); copying it into the
#: Redis outbox would let a flood of garbage fill a noeviction Redis (64 KiB became ~87 KB
#: of base64 per bad message).
DEAD_LETTER_BODY_MAX = 512


class PartitionRunner:
    def __init__(
        self,
        lease: Lease,
        settings: Settings,
        store: PartitionStore,
        consumer: Any,
        ticks: StreamWriter,
        channel: AbstractChannel,
        declared: set[str],
        worker_id: str,
    ) -> None:
        self.lease = lease
        self.partition = lease.partition
        self.settings = settings
        self.store = store
        self.stats = PartitionStats(offset=lease.offset)
        self.consumer = consumer  # this partition's own stream connection (the worker closes it)
        self._ticks = ticks
        self._channel = channel
        self._declared = declared
        self._stream = c.ingest_partition(settings.namespace, self.partition)
        self._tick = orjson.dumps(Tick(worker=worker_id).model_dump())
        self._buf: list[tuple[int, int, bytes]] = []
        self._has_data = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._outbox_wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._applied_all = asyncio.Event()
        self._last_delivery = 0.0
        self._subscriber_id: int | None = None
        self._failure: BusregError | None = None
        self._partition_cache: dict[str, int] = {}
        auth = settings.auth
        self._authorizer = (
            Authorizer(auth.secret_bytes(), auth.owners, auth.accept_unsigned_amqp)
            if auth.mode == "enforce"
            else None
        )

    @property
    def stream(self) -> str:
        return self._stream

    # --- stream callback ------------------------------------------------------------------

    async def _on_message(self, body: bytes, ctx: Any) -> None:
        if self._stopping.is_set():
            return  # handing over: the next owner reads it from the committed offset
        self._buf.append((ctx.offset, ctx.timestamp, body))
        self._last_delivery = time.monotonic()
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
            # no committed offset: rebuild from the recent past (heartbeats carry everything)
            since = int((time.time() - self.settings.worker.replay_window) * 1000)
            spec = ConsumerOffsetSpecification(OffsetType.TIMESTAMP, since)
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
        self._has_data.set()
        self._outbox_wake.set()
        self._space.set()  # a stream callback blocked on backpressure returns (and drops)

    async def run(self) -> None:
        """Run until stopped (returns) or fenced (raises Fenced)."""
        try:
            await self._drain_once_all()  # entries a previous owner committed but never sent
            await self._subscribe()
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

    # --- apply ------------------------------------------------------------------------------

    def _dead_letter(self, reason: str, detail: str, offset: int, body: bytes) -> str:
        self.stats.dead_lettered += 1
        self.stats.dead_by_reason[reason] = self.stats.dead_by_reason.get(reason, 0) + 1
        record = {
            "v": c.PROTOCOL_VERSION,
            "reason": reason,
            "detail": detail[:500],
            "stream": self._stream,
            "partition": self.partition,
            "offset": offset,
            "size": len(body),
            "body_b64": base64.b64encode(body[:DEAD_LETTER_BODY_MAX]).decode(),
        }
        dlx = c.dead_letter_exchange(self.settings.namespace)
        return f"{dlx}{SEP}{reason}{SEP}" + orjson.dumps(record).decode()

    def _encode(self, batch: list[tuple[int, int, bytes]]) -> list[Any]:
        args: list[Any] = []
        parts = self.settings.partitions
        cache = self._partition_cache
        for offset, ts, body in batch:
            try:
                decoded = decode_ingest(body)
                event = decoded.event
                if isinstance(event, Tick):
                    args += (offset, ts, "N", "", "", "", 0, "")
                    continue
                k = cache.get(event.service)
                if k is None:
                    k = cache[event.service] = partition_for(event.service, parts)
                    if len(cache) > 100_000:  # bounded memory whatever arrives
                        cache.clear()
                if k != self.partition:
                    raise InvalidEvent(
                        WRONG_PARTITION, f"service {event.service!r} belongs to partition {k}"
                    )
                if self._authorizer is not None:
                    refusal = self._authorizer.check(
                        event.service, decoded.payload, decoded.signature, decoded.user_id
                    )
                    if refusal is not None:
                        raise InvalidEvent(UNAUTHORISED, refusal)
                version = f"{event.incarnation:020d}{event.seq:016d}"
                if isinstance(event, Deregister):
                    args += (offset, ts, "D", event.service, event.instance_id, version, 0, "")
                else:
                    args += (
                        offset,
                        ts,
                        "U",
                        event.service,
                        event.instance_id,
                        version,
                        int(event.ttl * 1000),
                        encode_stored(event),
                    )
            except Exception as exc:  # one bad message must never stop a partition
                bad = exc if isinstance(exc, InvalidEvent) else None
                if bad is None:
                    log.exception(
                        "unexpected decode failure partition=%d offset=%d", self.partition, offset
                    )
                    bad = InvalidEvent("invalid", f"decoder failure: {exc!r}")
                log.warning(
                    "dead-letter partition=%d offset=%d reason=%s detail=%s",
                    self.partition,
                    offset,
                    bad.reason,
                    bad.detail[:200],
                )
                dead = self._dead_letter(bad.reason, bad.detail, offset, body)
                args += (offset, ts, "N", "", "", "", 0, dead)
        return args

    async def _apply_loop(self) -> None:
        wcfg = self.settings.worker
        limits = (
            int(wcfg.max_clock_step * 1000),
            int(wcfg.tombstone_ttl * 1000),
            int(wcfg.outage_grace * 1000),
        )
        # One batch is in Redis while the next is decoded: decoding is most of the worker's
        # CPU, and this overlaps it with the script's round trip. Batches still commit in
        # order: batch n+1 is sent only after batch n's result came back.
        inflight: asyncio.Future[ApplyResult] | None = None

        async def finish() -> None:
            nonlocal inflight
            if inflight is not None:
                pending, inflight = inflight, None
                result = await pending
                self._record(result)
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
                batch = self._buf[: wcfg.batch_max]
                del self._buf[: wcfg.batch_max]
                if not self._buf:
                    self._has_data.clear()
                if len(self._buf) < wcfg.buffer_max // 2:
                    self._space.set()
                args = self._encode(batch)
                await finish()
                apply = partial(self.store.apply, self.lease, args, len(batch), *limits)
                # owned by this loop: awaited by finish() or cancelled below, never lost
                inflight = asyncio.ensure_future(self._retrying("apply", apply))
        finally:
            if inflight is not None:
                inflight.cancel()

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

    def _record(self, result: ApplyResult) -> None:
        s = self.stats
        s.applied += result.applied
        s.stale += result.stale
        s.replayed += result.replayed
        s.expired += result.expired
        s.offset = result.offset
        s.outbox = result.outbox
        s.batches += 1

    # --- outbox -----------------------------------------------------------------------------

    async def _publish(self, entries: list[bytes]) -> None:
        channel = self._channel
        ns = self.settings.namespace
        futures = []
        with translate("publish deltas"):
            for raw in entries:
                exchange, routing_key, body = raw.split(SEP.encode(), 2)
                name = exchange.decode()
                prefix = c.service_exchange(ns, "")
                if name not in self._declared and name.startswith(prefix):
                    # per-service exchanges are made on first use (the dead-letter
                    # exchange is part of the topology)
                    await declare_service_exchange(channel, ns, name[len(prefix) :])
                    self._declared.add(name)
                underlay = await channel.get_underlay_channel()
                # aiormq serialises publishes under a FIFO lock, so starting them in order
                # keeps per-service delta order; the confirms are awaited together
                futures.append(
                    asyncio.ensure_future(
                        underlay.basic_publish(
                            body,
                            exchange=name,
                            routing_key=routing_key.decode(),
                            properties=aiormq.spec.Basic.Properties(
                                delivery_mode=2, content_type="application/json"
                            ),
                        )
                    )
                )
            try:
                async with asyncio.timeout(c.WORKER_BROKER_TIMEOUT):
                    results = await asyncio.gather(*futures, return_exceptions=True)
            except TimeoutError:
                for f in futures:
                    f.cancel()
                raise PublishFailed(
                    f"no confirm for {len(entries)} deltas within {c.WORKER_BROKER_TIMEOUT}s"
                ) from None
        for r in results:
            if isinstance(r, BaseException):
                with translate("publish deltas"):
                    raise r
            if isinstance(r, aiormq.spec.Basic.Nack):
                raise BusregError("broker nacked a delta publish")
        self.stats.published += len(entries)

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
        await self._retrying("delta publish", lambda: self._publish(entries), max_delay=2.0)

    async def _drain_loop(self) -> None:
        upto = -1
        while True:
            self._outbox_wake.clear()
            base, entries = await self._outbox_step(upto)
            if entries:
                await self._publish_with_retry(entries)
                upto = base + len(entries)
                continue
            if self._applied_all.is_set() or self._failure is not None:
                return
            await self._outbox_wake.wait()

    # --- watermark ticks ----------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        interval = self.settings.worker.tick_interval
        while not self._stopping.is_set():
            # a periodic timer, not synchronisation: wake at the tick rate or on stop
            try:
                async with asyncio.timeout(interval):
                    await self._stopping.wait()
                return
            except TimeoutError:
                pass
            if time.monotonic() - self._last_delivery < interval * 0.9:
                continue  # traffic is moving the watermark already
            try:
                await self._ticks.send(self._stream, self._tick, timeout=max(1.0, interval * 10))
            except BusregError as exc:
                log.warning("partition=%d tick failed: %s", self.partition, exc)
