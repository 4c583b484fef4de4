"""Answering snapshot and service-list requests from ``<ns>.rpc`` (any worker, any partition).

Requests are reads of Redis, so any live worker may answer any of them: the queue is
shared (competing consumers), and a client resends a request that no worker answered in
time. Every request is acked once answered, whatever the answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from pydantic import ValidationError

from busreg import constants as c
from busreg.errors import BusregError
from busreg.server.store import PartitionStore
from busreg.settings import Settings
from busreg.tasks import close_quietly
from busreg.transport.connections import translate
from busreg.transport.queues import queue_has_arguments
from busreg.wire.models import Snapshot, SnapshotRequest, validation_message
from busreg.wire.routing import partition_for

__all__ = ["RpcServer"]

log = logging.getLogger("busreg.worker")

#: Requests a worker holds unacked at once: small, so requests held by a paused worker wait
#: for it only briefly; clients resend to whichever worker is free.
PREFETCH = 4


class RpcServer:
    """Consumes ``<ns>.rpc`` on its own channel; replies go out on ``reply_channel``."""

    def __init__(
        self,
        settings: Settings,
        store: PartitionStore,
        connection: AbstractRobustConnection,
        reply_channel: AbstractChannel,
    ) -> None:
        self._settings = settings
        self._store = store
        self._connection = connection
        self._reply_channel = reply_channel
        #: requests answered (any answer), for the worker's metrics
        self.requests = 0

    async def serve(self) -> None:
        """Consume until cancelled."""
        name = c.rpc_queue(self._settings.namespace)
        with translate("rpc consumer"):
            # A namespace from an older busreg has a classic rpc queue, which this worker
            # serves as it is until `busreg topology apply` migrates it (a worker must not
            # delete a queue other workers consume). After the migration the broker cancels
            # our consumer and the robust channel subscribes to the new queue.
            current = await queue_has_arguments(self._connection, name, c.rpc_queue_arguments())
            if current is False:
                log.warning(
                    "queue %s is a classic queue (namespace from an older busreg): served as "
                    "it is; run `busreg topology apply` to make it a quorum queue",
                    name,
                )
            channel = await self._connection.channel()
            await channel.set_qos(prefetch_count=PREFETCH)
            # declared (same arguments as the topology), not just looked up: the robust
            # channel then re-creates the consumer after a broker restart
            if current is False:
                queue = await channel.declare_queue(name, passive=True)
            else:
                queue = await channel.declare_queue(
                    name, durable=True, arguments=c.rpc_queue_arguments()
                )
            await queue.consume(self._on_request)
        try:
            await asyncio.Future()  # consume until cancelled
        finally:
            if not channel.is_closed:
                await close_quietly(channel.close, "rpc channel")

    async def _on_request(self, message: AbstractIncomingMessage) -> None:
        self.requests += 1
        try:
            reply = await self._answer(message.body)
        except BusregError as exc:
            reply = {"v": 1, "error": "unavailable", "detail": str(exc)}
        except Exception as exc:
            # any failure is answered and the request acked: an unacked request holds one
            # of the PREFETCH slots for good, and after PREFETCH of them this worker would
            # answer nobody
            log.exception("rpc request failed")
            reply = {"v": 1, "error": "internal", "detail": f"{type(exc).__name__}: {exc}"}
        if message.reply_to:
            try:
                with translate("rpc reply"):
                    await self._reply_channel.default_exchange.publish(
                        aio_pika.Message(
                            orjson.dumps(reply),
                            correlation_id=message.correlation_id,
                            content_type="application/json",
                        ),
                        routing_key=message.reply_to,
                    )
            except BusregError as exc:
                log.warning("rpc reply failed: %s", exc)
        with translate("rpc ack"):
            await message.ack()

    async def _answer(self, body: bytes) -> dict[str, Any]:
        try:
            request = SnapshotRequest.model_validate_json(body)
        except ValidationError as exc:
            detail = validation_message(exc)
            log.warning("bad snapshot request: %s", detail)
            return {"v": 1, "error": "invalid-request", "detail": detail}
        parts = self._settings.partitions
        if request.op == "services":
            rows = []
            for k in range(parts):
                rows += [dataclasses.asdict(r) for r in await self._store.services(k)]
            rows.sort(key=lambda r: r["service"])
            return {"v": 1, "services": rows}
        if request.service is None:
            return {"v": 1, "error": "invalid-request", "detail": "snapshot needs a service"}
        k = partition_for(request.service, parts)
        rows_ = await self._store.snapshot(k, request.service)
        if rows_.rebuilding:
            # half a replay is not the registry's state: the client asks again shortly and
            # a live view keeps what it has meanwhile
            return {"v": 1, "error": "rebuilding", "detail": f"partition {k} is rebuilding"}
        snap = Snapshot(
            service=request.service,
            epoch=rows_.epoch,
            revision=rows_.revision,
            instances=rows_.instances,
        )
        return snap.model_dump(mode="json")
