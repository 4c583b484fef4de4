"""Publishing a partition's deltas to their service exchanges, with publisher confirms.

Each partition runner has its own ``DeltaPublisher``: its own AMQP connection and confirm
channel, opened on first use and again after any failed publish. A publish the broker
refuses (404: an operator deleted the exchange) closes its channel, and aiormq then still
sends the publishes queued behind it, which the broker answers by closing the whole
connection (504). On the worker's shared connection (or channel) one service's missing
exchange failed every partition's deltas and the RPC replies.
"""

from __future__ import annotations

import asyncio

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from busreg import constants as c
from busreg.errors import BusregError, ConnectionFailed, PublishFailed
from busreg.server.stats import PartitionStats
from busreg.settings import Settings
from busreg.tasks import close_quietly
from busreg.transport.connections import connect_amqp_once, translate
from busreg.transport.topology import declare_service_exchange

__all__ = ["DeltaPublisher"]

SEP = c.FIELD_SEPARATOR
#: Bound on the service exchanges one publisher remembers as declared (then it forgets them
#: all and declares each again on its next use), whatever number of services a partition sees.
DECLARED_MAX = 100_000


class DeltaPublisher:
    """``publish(entries)`` (outbox entries: exchange, routing key, body) in order; returns
    once the broker confirmed every one. ``close()`` when done (best effort, bounded)."""

    def __init__(
        self, settings: Settings, partition: int, worker_id: str, stats: PartitionStats
    ) -> None:
        self.settings = settings
        self.partition = partition
        self.stats = stats
        self._worker_id = worker_id
        self._amqp: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        #: service exchanges this runner declared; a failed publish forgets the ones its
        #: batch used (an operator may have deleted one), so the retry declares them again
        self._declared: set[str] = set()

    async def _publish_channel(self) -> AbstractChannel:
        """This runner's confirm channel, on its own connection; both are opened when
        missing or closed. Plain, not robust: a robust channel or connection re-opens itself
        behind our back (a robust channel re-declares every exchange it ever declared,
        deleted ones included) and races the retry; here the retry opens new ones."""
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        self._channel = None
        what = f"open publish channel of partition {self.partition}"
        with translate(what):
            async with asyncio.timeout(c.WORKER_BROKER_TIMEOUT):
                if self._amqp is None or self._amqp.is_closed:
                    await self.close()
                    name = f"busreg-worker {self._worker_id} p{self.partition} publish"
                    self._amqp = await connect_amqp_once(self.settings, name)
                try:
                    channel = await self._amqp.channel(publisher_confirms=True)
                except RuntimeError as exc:
                    # aiormq's "<Connection ...> closed": the connection was reset and
                    # aio-pika has not noticed yet; seen under the soak's AMQP resets
                    await self.close()
                    raise ConnectionFailed(f"{what}: connection closed") from exc
        self._channel = channel
        return channel

    async def close(self) -> None:
        """Close this runner's publish channel and connection (best effort, bounded)."""
        channel, self._channel = self._channel, None
        amqp, self._amqp = self._amqp, None
        what = f"publish connection of partition {self.partition}"
        if channel is not None and not channel.is_closed:
            await close_quietly(channel.close, what, timeout=1.0)
        if amqp is not None and not amqp.is_closed:
            await close_quietly(amqp.close, what, timeout=1.0)

    async def publish(self, entries: list[bytes]) -> None:
        ns = self.settings.namespace
        prefix = c.service_exchange(ns, "")
        parsed = [raw.split(SEP.encode(), 2) for raw in entries]
        try:
            await self._publish_parsed(parsed, prefix)
        except BusregError:
            # Whatever failed, nothing of this batch is trimmed from the outbox (only
            # confirmed entries are), and the retry starts clean: its exchanges are declared
            # again (a 404 means one was deleted since we declared it), on a new connection
            # (the broker closed the channel on the 404, and the connection too if more
            # publishes followed; after a missing confirm both are in doubt).
            self._declared.difference_update(exchange.decode() for exchange, _, _ in parsed)
            await self.close()
            raise
        self.stats.published += len(entries)

    async def _publish_parsed(self, parsed: list[list[bytes]], prefix: str) -> None:
        channel = await self._publish_channel()
        futures = []
        with translate("publish deltas"):
            for exchange, routing_key, body in parsed:
                name = exchange.decode()
                if name not in self._declared and name.startswith(prefix):
                    # per-service exchanges are made on first use (the dead-letter
                    # exchange is part of the topology)
                    await declare_service_exchange(
                        channel, self.settings.namespace, name[len(prefix) :]
                    )
                    if len(self._declared) >= DECLARED_MAX:
                        self._declared.clear()
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
                    f"no confirm for {len(parsed)} deltas within {c.WORKER_BROKER_TIMEOUT}s"
                ) from None
        for r in results:
            if isinstance(r, BaseException):
                with translate("publish deltas"):
                    raise r
            if isinstance(r, aiormq.spec.Basic.Nack):
                raise BusregError("broker nacked a delta publish")
