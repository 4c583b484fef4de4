"""A live local view of one service: snapshot + deltas (list-then-watch).

The view binds its own queue to the service's delta exchange *before* reading the snapshot,
so no change can fall between the two; deltas at or below the snapshot's revision are
dropped, and a skipped revision or a new epoch makes the view re-read the snapshot. The
broker queue and the view's own inbox are both bounded by ``client.watch_queue_max``: the
queue is consumed without acks, so the broker pushes as fast as it can and the inbox is
where a slow view falls behind. A full inbox is dropped whole and replaced by one snapshot
read (see ``_offer``), so a slow view costs a resync, never memory and never correctness.
An unexpected error while applying a delta is logged and answered the same way: the delta
is lost, so the view re-reads the snapshot; the loop itself never ends for it.

    view = await registry.watch("inventory")
    view.instances            # {instance_id: Instance}, always consistent with .revision
    async for change in view.changes():
        ...
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import ValidationError

from busreg.backoff import Backoff, RetryLog
from busreg.client.revisions import Change, Outcome, ViewState
from busreg.client.rpc import RpcClient
from busreg.errors import BusregError, ClosedError
from busreg.tasks import close_quietly
from busreg.transport.connections import translate
from busreg.transport.queues import declare_exclusive_queue, queue_exists
from busreg.transport.topology import declare_service_exchange
from busreg.wire.models import Delta, Instance, validation_message

__all__ = ["ChangeStream", "ServiceView"]

log = logging.getLogger("busreg.client")

#: Changes kept for a slow ``changes()`` iterator before the oldest are dropped (the view
#: itself stays exact; only the iterator's history is bounded).
CHANGE_BUFFER = 10_000
#: Pauses before re-trying a snapshot read that failed (workers unreachable); short, since
#: the view is stale until it succeeds, and each try is one small request.
RESYNC_BACKOFF = Backoff(first=0.5, cap=1.0)
#: Bound on closing a view's channel and queue (best effort).
CLOSE_TIMEOUT = 3.0


class _Resync:
    """Inbox marker: re-read the snapshot (after a reconnect)."""


RESYNC = _Resync()


class ChangeStream:
    """Async iterator of one listener's changes; ``aclose()`` (or the view closing) ends it."""

    def __init__(self, listeners: list[asyncio.Queue[Change | None]]) -> None:
        self._queue: asyncio.Queue[Change | None] = asyncio.Queue(CHANGE_BUFFER)
        self._listeners = listeners
        listeners.append(self._queue)

    def __aiter__(self) -> ChangeStream:
        return self

    async def __anext__(self) -> Change:
        change = await self._queue.get()
        if change is None:
            await self.aclose()
            raise StopAsyncIteration
        return change

    async def aclose(self) -> None:
        if self._queue in self._listeners:
            self._listeners.remove(self._queue)


class ServiceView:
    """Live, self-healing view of one service. Create with ``Registry.watch``."""

    def __init__(
        self,
        service: str,
        connection: AbstractRobustConnection,
        rpc: RpcClient,
        namespace: str,
        *,
        request_timeout: float,
        queue_max: int,
        resync_interval: float | None,
    ) -> None:
        self.service = service
        self.state = ViewState(service)
        self._connection = connection
        self._channel: AbstractChannel | None = None
        self._rpc = rpc
        self._namespace = namespace
        self._timeout = request_timeout
        self._queue_max = queue_max
        self._resync_interval = resync_interval
        # bounded like the broker queue: see _offer for what a full inbox means
        self._inbox: asyncio.Queue[Delta | _Resync | None] = asyncio.Queue(queue_max)
        self._overflow_pending = False
        self._listeners: list[asyncio.Queue[Change | None]] = []
        self._updated = asyncio.Condition()
        self._closed = False
        self._queue: AbstractQueue | None = None
        self._exchange: AbstractExchange | None = None
        self._consumer_tag: str | None = None
        #: set by a reconnect: the next resync binds a new queue first (see _bind)
        self._rebind = False
        self.resyncs = 0
        self._failures = RetryLog(log, f"watch {service}")
        self.deltas_applied = 0
        #: Times the inbox overflowed (each answered by one snapshot read).
        self.overflows = 0
        #: Unexpected errors in the run loop (each logged and answered by a resync).
        self.errors = 0

    # --- public -------------------------------------------------------------------------------

    @property
    def instances(self) -> dict[str, Instance]:
        return dict(self.state.instances)

    @property
    def revision(self) -> int:
        return self.state.revision

    @property
    def epoch(self) -> str | None:
        return self.state.epoch

    def changes(self) -> ChangeStream:
        """Every change from this call on (resyncs appear as changes with reason 'resync').

        Changes are buffered from the moment of the call, not of the first ``anext``."""
        if self._closed:
            raise ClosedError("view is closed")
        stream = ChangeStream(self._listeners)
        return stream

    async def wait_for(
        self, predicate: Callable[[dict[str, Instance]], bool], timeout: float
    ) -> dict[str, Instance]:
        """Wait until ``predicate(instances)`` holds; raise TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout), self._updated:
            await self._updated.wait_for(lambda: predicate(self.state.instances))
            return dict(self.state.instances)

    async def resync(self) -> None:
        """Re-read the snapshot now (also done by itself on any gap)."""
        snapshot = await self._rpc.snapshot(self.service, self._timeout)
        self.resyncs += 1
        await self._emit(self.state.load(snapshot))

    # --- lifecycle (driven by Registry) ---------------------------------------------------------

    async def start(self) -> None:
        await self._bind()
        await self.resync()
        # deltas published while we were disconnected are gone: re-read after a reconnect
        self._connection.reconnect_callbacks.add(self._on_reconnect)

    @property
    def closed(self) -> bool:
        return self._closed

    def request_resync(self) -> None:
        """Have the run loop re-read the snapshot soon (ignored once closed)."""
        if not self._closed:
            self._offer(RESYNC)

    def _on_reconnect(self, *_: object) -> None:
        self._rebind = True  # the queue went with the old connection (see _bind)
        self.request_resync()

    def _offer(self, item: Delta | _Resync) -> None:
        """Queue ``item`` for the run loop; a full inbox is dropped whole for a resync.

        Once a delta cannot be queued the view has lost it, and the queued ones are only
        worth the snapshot that will supersede them: drop them all and queue one RESYNC
        (with ``item`` behind it). Overflows while that RESYNC is still queued are the same
        overflow: the inbox is emptied again but the one pending snapshot read covers them,
        so there is exactly one resync per overflow, not one per dropped delta."""
        if not self._inbox.full():
            self._inbox.put_nowait(item)
            return
        dropped = self._drain()
        if self._overflow_pending:
            log.debug("watch inbox of %s overflowed again; dropped %d", self.service, dropped)
        else:
            self.overflows += 1
            self._overflow_pending = True
            log.warning(
                "watch inbox of %s full (%d); dropped %d deltas, re-reading the snapshot",
                self.service,
                self._inbox.maxsize,
                dropped,
            )
        self._inbox.put_nowait(RESYNC)
        if item is not RESYNC:
            self._inbox.put_nowait(item)

    def _drain(self) -> int:
        dropped = 0
        while not self._inbox.empty():
            self._inbox.get_nowait()
            dropped += 1
        return dropped

    async def _bind(self) -> None:
        with translate(f"watch {self.service}"):
            if self._channel is None or self._channel.is_closed:
                self._channel = await self._connection.channel()
            exchange = await declare_service_exchange(self._channel, self._namespace, self.service)
            self._exchange = exchange
            # not restored by aio-pika after a reconnect: _bind_again makes a new one
            self._queue = await declare_exclusive_queue(
                self._channel, {"x-max-length": self._queue_max, "x-overflow": "drop-head"}
            )
            await self._queue.bind(exchange, routing_key="#")
            self._consumer_tag = await self._queue.consume(self._on_delta, no_ack=True)

    async def _on_delta(self, message: AbstractIncomingMessage) -> None:
        try:
            delta = Delta.model_validate_json(message.body)
        except ValidationError as exc:
            log.warning("ignoring malformed delta on %s: %s", self.service, validation_message(exc))
            return
        self._offer(delta)

    async def run(self) -> None:
        """Apply deltas in order; re-read the snapshot on gaps and periodically."""
        loop = asyncio.get_running_loop()
        next_check = loop.time() + (self._resync_interval or float("inf"))
        while not self._closed:
            try:
                async with asyncio.timeout(max(0.0, next_check - loop.time())):
                    delta = await self._inbox.get()
            except TimeoutError:
                next_check = loop.time() + (self._resync_interval or float("inf"))
                await self._guarded(lambda: self._safe(self._periodic_check))
                continue
            if delta is None:
                return
            await self._guarded(functools.partial(self._handle, delta))

    async def _guarded(self, step: Callable[[], Awaitable[object]]) -> None:
        """Run one step of the loop; an unexpected error is logged and answered by a resync.

        A bug, or an error nobody foresaw, must not end the view (nor, through the
        registry, anything else): whatever was being applied is lost, so the view may be
        wrong, and it re-reads the snapshot, after a pause so a lasting error cannot spin."""
        try:
            await step()
        except Exception as exc:
            self.errors += 1
            if self._failures.failures == 0:
                log.error(
                    "unexpected error in the watch of %s; re-reading the snapshot",
                    self.service,
                    exc_info=exc,
                )
            self._failures.failed(exc)
            self._retry_resync_later()

    async def _handle(self, delta: Delta | _Resync) -> None:
        if isinstance(delta, _Resync):
            self._overflow_pending = False  # later overflows need a later snapshot
            if self._rebind and not await self._safe(self._bind_again):
                self._retry_resync_later()
                return
            if not await self._safe(self.resync):
                self._retry_resync_later()
            return
        outcome, change = self.state.apply(delta)
        if outcome is Outcome.APPLIED and change is not None:
            self.deltas_applied += 1
            await self._emit([change])
        elif outcome is Outcome.GAP:
            log.info(
                "revision gap service=%s have=%s/%d got=%s/%d; re-reading snapshot",
                self.service,
                self.state.epoch,
                self.state.revision,
                delta.epoch,
                delta.revision,
            )
            if not await self._safe(self.resync):
                self._retry_resync_later()
                return
            outcome, change = self.state.apply(delta)
            if outcome is Outcome.APPLIED and change is not None:
                await self._emit([change])

    async def _bind_again(self) -> None:
        """A new queue on the current connection (after a reconnect), before the resync."""
        if self._channel is not None and not self._channel.is_closed:
            await close_quietly(self._channel.close, "watch channel")
        self._channel = None
        await self._bind()
        self._rebind = False

    async def _periodic_check(self) -> None:
        # our queue may have been deleted (operator, broker restart without recovery): a
        # passive declare on a throwaway channel tells; then re-read the snapshot either way
        if self._queue is not None and not await self._queue_exists(self._queue.name):
            log.info("watch queue of %s vanished; re-binding", self.service)
            if self._channel is not None and not self._channel.is_closed:
                await close_quietly(self._channel.close, "watch channel")  # half-dead: replace
            self._channel = None
            await self._bind()
        await self.resync()

    async def _queue_exists(self, name: str) -> bool:
        with translate("watch queue check"):
            return await queue_exists(self._connection, name)

    async def _safe(self, action: Callable[[], Awaitable[None]]) -> bool:
        try:
            await action()
        except BusregError as exc:
            self._failures.failed(exc)  # a streak is logged once
            return False
        self._failures.recovered()
        return True

    def _retry_resync_later(self) -> None:
        # the broker or the workers are not back yet: try again shortly, off the loop
        delay = RESYNC_BACKOFF.delay(self._failures.failures - 1)
        asyncio.get_running_loop().call_later(delay, self.request_resync)

    async def _emit(self, changes: list[Change]) -> None:
        for queue in self._listeners:
            for change in changes:
                if queue.full():
                    queue.get_nowait()  # bounded: drop the oldest for a slow reader
                queue.put_nowait(change)
        async with self._updated:
            self._updated.notify_all()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._connection.reconnect_callbacks.discard(self._on_reconnect)
        self._drain()  # nothing queued matters any more, and the end marker must fit
        self._inbox.put_nowait(None)
        for queue in self._listeners:
            queue.put_nowait(None)
        if self._channel is not None and not self._channel.is_closed:
            try:
                # best effort, and bounded: a broker that does not answer must not hold up
                # the registry's shutdown
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    # cancel our consumer first: deleting a queue under it makes the broker
                    # cancel it, which aiormq reports as a warning
                    if self._queue is not None:
                        if self._consumer_tag is not None:
                            await self._queue.cancel(self._consumer_tag)
                        await self._queue.delete(if_unused=False, if_empty=False)
                    if self.state.revision == 0 and self._exchange is not None:
                        # the service never had an instance: the exchange this view declared
                        # would outlive it, and `topology delete` cannot know it. Deleted
                        # only while nobody is bound (if-unused); a worker that publishes
                        # to it meanwhile declares it again (its cache is dropped on error)
                        await self._exchange.delete(if_unused=True)
                    await self._channel.close()
            except Exception as exc:  # the channel may already be gone; nothing to keep
                log.debug("watch close: %r", exc)
