"""Notices between workers: "I left, look at the live set now".

Workers read the live set every third of the ownership lease (0.5 s by default), which is
all an idle namespace should pay. A worker that stops gracefully releases its partitions at
once; without a notice the others would take them only at their next round. So a leaving
worker sends a notice to each live peer's own queue (``<ns>.worker.<id>``, exclusive, on the
default exchange: no topology to declare) and each peer makes a membership round at once.

A notice is a hint, never needed for correctness: lost, it costs one round's delay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from busreg import constants as c
from busreg.errors import BusregError
from busreg.settings import Settings
from busreg.tasks import close_quietly
from busreg.transport.connections import translate

__all__ = ["PeerNotices"]

log = logging.getLogger("busreg.worker")

#: A notice is a hint: one that is not confirmed by then is given up (the peers see the
#: change at their next membership round anyway).
NOTICE_TIMEOUT = 1.0


class PeerNotices:
    """Receives notices for ``worker_id`` (``serve``) and sends them to peers (``tell``)."""

    def __init__(
        self,
        settings: Settings,
        connection: AbstractRobustConnection,
        publish_channel: AbstractChannel,
        worker_id: str,
        on_notice: Callable[[], None],
    ) -> None:
        self._ns = settings.namespace
        self._connection = connection
        self._publish_channel = publish_channel
        self._worker_id = worker_id
        self._on_notice = on_notice
        self._soon = asyncio.Event()
        self.received = 0

    def soon(self) -> None:
        """Have ``tell_when_asked`` tell the peers (coalesced; callable from anywhere)."""
        self._soon.set()

    async def tell_when_asked(self, peers: Callable[[], Iterable[str]]) -> None:
        """Tell ``peers()`` after each ``soon()`` (until cancelled)."""
        while True:
            await self._soon.wait()
            self._soon.clear()
            await self.tell(peers())

    async def serve(self, ready: asyncio.Event) -> None:
        """Consume this worker's notice queue until cancelled; ``ready`` once consuming."""
        with translate("worker notice queue"):
            # robust: declared again, and consumed, after a reconnection
            channel = await self._connection.channel()
            queue = await channel.declare_queue(
                c.worker_notice_queue(self._ns, self._worker_id), exclusive=True, auto_delete=True
            )
            await queue.consume(self._on_message, no_ack=True)
        ready.set()
        try:
            await asyncio.Future()  # consume until cancelled
        finally:
            if not channel.is_closed:
                await close_quietly(channel.close, "notice channel")

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.received += 1
        self._on_notice()

    async def tell(self, peers: Iterable[str]) -> None:
        """Send a notice to each of ``peers`` (best effort, bounded: a hint)."""
        targets = [p for p in peers if p != self._worker_id]
        if not targets:
            return
        exchange = self._publish_channel.default_exchange
        body = aio_pika.Message(self._worker_id.encode(), expiration=NOTICE_TIMEOUT * 10)
        try:
            async with asyncio.timeout(NOTICE_TIMEOUT):
                with translate("worker notice"):
                    await asyncio.gather(
                        *(
                            exchange.publish(body, routing_key=c.worker_notice_queue(self._ns, p))
                            for p in targets
                        )
                    )
        except (TimeoutError, BusregError) as exc:
            log.info("notice to peers not confirmed (they see it at their next round): %s", exc)
