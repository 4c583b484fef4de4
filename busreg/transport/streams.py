"""Stream-protocol plumbing shared by registrants and workers: confirmed sends into the
ingest partitions (``StreamWriter``), and reading where each partition's stream ends.

Registrations and heartbeats, and a worker's watermark ticks, all go through a
``StreamWriter``; ``busreg status`` and the worker's metrics read stream heads here.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from busreg import constants as c
from busreg.errors import BusregError, ClosedError, PublishFailed
from busreg.settings import Settings
from busreg.tasks import close_quietly
from busreg.transport.connections import stream_consumer, stream_producer, translate_stream
from busreg.transport.topology import partition_error

__all__ = ["StreamWriter", "peek_heads", "stream_heads"]

log = logging.getLogger("busreg.streams")

#: Budget of one attempt to connect and declare a publisher. Right after a broker restart a
#: connect can hang (listener up, stream not yet); a short attempt that fails lets the
#: next send start a fresh one instead of everyone waiting on a stuck socket.
WARM_UP_TIMEOUT = 2.0

#: Consecutive unconfirmed sends to one stream after which the connection is replaced.
#: One: on a cluster, a publisher left on a node that is stopping (or that lost the
#: stream's leadership) accepts sends and never confirms them, and a heartbeat can only
#: miss so many; replacing costs one reconnect (~20 ms), waiting a second timeout cost
#: instances their TTL during a rolling restart.
SILENT_LIMIT = 1

#: How long a head peek waits for the last chunk of a partition stream. An empty stream
#: sends nothing, so this is also how long an empty partition costs.
PEEK_TIMEOUT = 0.25


class StreamWriter:
    """Confirmed sends to streams over one stream-protocol connection, re-created on demand.

    rstream's own recovery waits 1 s plus a random 1-8 s before reconnecting; a registry
    cannot wait that long (instances would miss their TTL). Instead a connection that failed
    a send is dropped and a new one is prepared by a warm-up task owned by this writer:
    connect and declare the stream's publisher once, however many senders are waiting, and
    without being cancelled by any one sender's (short) timeout.
    """

    def __init__(
        self,
        settings: Settings,
        name: str,
        on_disrupted: Callable[[list[str]], None] | None = None,
    ) -> None:
        self._settings = settings
        self._name = name
        #: told the streams this writer lost its way to: rstream reported their connection
        #: closed (node gone, or a leader moved), or a send to one went unconfirmed
        self._on_disrupted = on_disrupted
        self._producer: Any = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._ready: set[str] = set()  # streams with a publisher on the current producer
        self._warmups: dict[str, asyncio.Future[Any]] = {}
        # rstream creates publishers under its own lock inside a send; declared ahead of
        # time they need ours (concurrent declarations, even for different streams, race)
        self._declare_lock = asyncio.Lock()
        # consecutive sends without a confirm, per stream: sends to other streams succeeding
        # say nothing about this one's publisher (after a leader moved, one stream's
        # publisher can stay silent for ever while the rest confirm)
        self._silent: dict[str, int] = {}
        #: the producer whose connection rstream reported closed (replaced on next use)
        self._broken: Any = None

    async def _get(self) -> Any:
        async with self._lock:
            if self._closed:
                raise ClosedError("stream writer is closed")
            if self._producer is None:
                made: list[Any] = []

                async def on_close(info: Any) -> None:
                    # rstream says a connection of this producer closed (node gone, or
                    # "Metadata Update": a stream's leader moved): its publishers are
                    # dead, so the next send builds anew instead of timing out twice
                    if made:
                        self._broken = made[0]
                        log.debug("stream writer %s: connection closed (%s)", self._name, info)
                        self._disrupted(list(getattr(info, "streams", None) or []))

                self._producer = await stream_producer(
                    self._settings, self._name, timeout=WARM_UP_TIMEOUT, on_close=on_close
                )
                made.append(self._producer)
                self._ready = set()
            return self._producer

    def _disrupted(self, streams: list[str]) -> None:
        if self._on_disrupted is not None and streams:
            self._on_disrupted(streams)

    async def _discard(self, producer: Any) -> None:
        async with self._lock:
            if self._producer is not producer:
                return  # another send already replaced it
            self._producer = None
            self._ready = set()
        log.debug("stream writer %s: dropped its connection", self._name)
        await close_quietly(producer.close, "stream producer", timeout=2)

    async def _warm(self, stream: str) -> Any:
        async with asyncio.timeout(WARM_UP_TIMEOUT):
            producer = await self._get()
            try:
                with translate_stream(f"prepare publisher for {stream}"):
                    # rstream declares a stream's publisher lazily inside the first send;
                    # doing it here once keeps concurrent first sends from racing in it
                    async with self._declare_lock:
                        await producer._get_or_create_publisher(stream)
            except BaseException:
                await self._discard(producer)
                raise
        if producer is self._producer:
            self._ready.add(stream)
        log.debug("stream writer %s: publisher ready for %s", self._name, stream)
        return producer

    async def _ready_producer(self, stream: str) -> Any:
        if self._producer is not None and self._producer is self._broken:
            await self._discard(self._producer)
        producer = self._producer
        if producer is not None and stream in self._ready:
            return producer
        warmup = self._warmups.get(stream)
        if warmup is None or warmup.done():
            warmup = asyncio.ensure_future(self._warm(stream))
            # the writer owns this task: its outcome is read by every waiter, and any
            # failure nobody waited for is logged rather than lost
            warmup.add_done_callback(_report_warmup)
            self._warmups[stream] = warmup
        return await asyncio.shield(warmup)

    async def send(self, stream: str, body: bytes, timeout: float) -> None:
        """Send once; raise PublishFailed unless the broker confirmed within ``timeout``."""
        from rstream import RawMessage

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                producer = await self._ready_producer(stream)
            try:
                async with asyncio.timeout_at(deadline):
                    with translate_stream(f"publish to {stream}"):
                        await producer.send_wait(
                            stream, RawMessage(body), timeout=max(1, math.ceil(timeout))
                        )
                self._silent.pop(stream, None)
            except TimeoutError:
                # a publisher that accepts sends but never confirms (seen after a broker
                # restart while its stream recovers, and on a cluster after the stream's
                # leader moved) must be replaced, not waited on
                silent = self._silent.get(stream, 0) + 1
                self._silent[stream] = silent
                if silent >= SILENT_LIMIT:
                    self._silent.clear()
                    self._disrupted([stream])
                    await self._discard(producer)
                raise
            except BusregError:
                self._disrupted([stream])
                await self._discard(producer)
                raise
        except TimeoutError as exc:
            raise PublishFailed(f"no confirm from {stream} within {timeout}s") from exc
        except BusregError as exc:
            if isinstance(exc, PublishFailed | ClosedError):
                raise
            raise PublishFailed(str(exc)) from exc

    async def check_partitions(self) -> None:
        """The namespace has exactly ``settings.partitions`` ingest streams, or
        TopologyMissing / PartitionMismatch: ``verify_partitions`` over the stream
        protocol, for registrants that open no AMQP connection."""
        ns, parts = self._settings.namespace, self._settings.partitions
        producer = await self._get()

        async def exists(k: int) -> bool:
            with translate_stream("topology check"):
                return bool(await producer.stream_exists(c.ingest_partition(ns, k)))

        if await exists(parts - 1) and not await exists(parts):
            return
        found = 0
        while await exists(found):
            found += 1
        raise partition_error(ns, parts, found)

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            producer, self._producer = self._producer, None
        for warmup in self._warmups.values():
            warmup.cancel()
        if producer is not None:
            await close_quietly(producer.close, "stream producer", timeout=2)


def _report_warmup(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("stream publisher warm-up failed: %r", task.exception())


async def _peek_head(consumer: Any, stream: str, timeout: float) -> int:
    """Offset of the newest message of ``stream`` (-1 if it is empty)."""
    from rstream import ConsumerOffsetSpecification, OffsetType

    newest = -1
    seen = asyncio.Event()

    async def on_message(_body: bytes, ctx: Any) -> None:
        nonlocal newest
        newest = max(newest, ctx.offset)
        seen.set()

    with translate_stream(f"peek {stream}"):
        sid = await consumer.subscribe(
            stream,
            on_message,
            offset_specification=ConsumerOffsetSpecification(OffsetType.LAST, None),
        )
        try:
            async with asyncio.timeout(timeout):
                await seen.wait()
                # the last chunk arrives in one frame: let its other messages land
                await asyncio.sleep(0.005)
        except TimeoutError:
            pass  # an empty stream sends no chunk
        finally:
            await consumer.unsubscribe(sid)
    return newest


async def peek_heads(
    consumer: Any,
    settings: Settings,
    partitions: Iterable[int] | None = None,
    timeout: float = PEEK_TIMEOUT,
) -> dict[int, int]:
    """Newest offset of each ingest partition's stream (-1 if empty), read concurrently over
    one started rstream Consumer (an unsubscribe alone takes about 0.2 s)."""
    ks = range(settings.partitions) if partitions is None else partitions
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = {
                k: tg.create_task(
                    _peek_head(consumer, c.ingest_partition(settings.namespace, k), timeout)
                )
                for k in ks
            }
    except* BusregError as group:
        # one error for the caller (a missing stream fails every peek alike), not a group
        raise group.exceptions[0] from None
    return {k: task.result() for k, task in tasks.items()}


async def stream_heads(
    settings: Settings, partitions: Iterable[int] | None = None, timeout: float = 1.0
) -> dict[int, int]:
    """``peek_heads`` over a connection of its own, closed afterwards."""
    consumer = await stream_consumer(settings, "busreg-heads")
    try:
        return await peek_heads(consumer, settings, partitions, timeout)
    finally:
        await close_quietly(consumer.close, "stream heads consumer", timeout=2)
