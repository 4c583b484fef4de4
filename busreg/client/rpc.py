"""Request/reply to the workers over AMQP: snapshots and the service list.

Clients need AMQP only, never Redis credentials. Requests go to the shared ``<ns>.rpc``
queue (any worker answers: all state is in Redis); replies come back on this client's
exclusive reply queue, matched by correlation id.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
)

from busreg import constants as c
from busreg.backoff import Backoff, retrying
from busreg.errors import BusregError, RequestTimeout
from busreg.transport.connections import translate
from busreg.transport.queues import declare_exclusive_queue
from busreg.wire.models import Snapshot, SnapshotRequest

__all__ = ["RpcClient"]

#: One attempt's wait before the request is sent again (to whichever worker is free). A
#: snapshot takes about a millisecond; a second means the worker holding it is stuck.
ATTEMPT_TIMEOUT = 1.0
#: A request that timed out is resent at once: each attempt already waited its timeout.
RESEND = Backoff(first=0.0, cap=0.0)
#: Pause before asking again a worker that said its partition is rebuilding (replaying the
#: stream after a Redis data loss; that takes a second or a few).
NOT_READY_PAUSE = 0.2


class _NotReady(Exception):
    """The partition is rebuilding: ask again shortly (internal to RpcClient.call)."""

log = logging.getLogger("busreg.client")


class RpcClient:
    def __init__(self, channel: AbstractChannel, namespace: str) -> None:
        self._channel = channel
        self._namespace = namespace
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._queue: AbstractQueue | None = None
        self._stale = False

    async def start(self) -> None:
        await self._declare()

    async def _declare(self) -> None:
        with translate("rpc reply queue"):
            # not restored by aio-pika after a reconnect: reconnected() has a new one made
            queue = await declare_exclusive_queue(self._channel)
            await queue.consume(self._on_reply, no_ack=True)
        self._queue = queue
        self._stale = False

    def reconnected(self) -> None:
        """The connection was re-made: the reply queue went with the old one."""
        self._stale = True

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.get(message.correlation_id or "")
        if future is None or future.done():
            return  # a reply that arrived after its caller gave up
        try:
            future.set_result(orjson.loads(message.body))
        except orjson.JSONDecodeError as exc:
            future.set_exception(BusregError(f"worker sent an invalid reply: {exc}"))

    async def call(self, request: SnapshotRequest, timeout: float) -> dict[str, Any]:
        """Send ``request``; resend it every ``ATTEMPT_TIMEOUT`` until a worker answers.

        Requests are reads, so resending is safe; it routes around a worker that is paused
        or dying with our request in its prefetch window (that worker's late reply, if any,
        is simply accepted or dropped)."""
        assert self._queue is not None, "RpcClient.start() first"
        loop = asyncio.get_running_loop()
        # one future per round of resends: a late reply to an earlier send still counts
        futures: list[asyncio.Future[dict[str, Any]]] = [loop.create_future()]
        body = request.model_dump_json().encode()
        deadline = loop.time() + timeout
        cids: list[str] = []

        async def attempt() -> dict[str, Any]:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            if self._stale:
                await self._declare()
            queue = self._queue
            assert queue is not None
            future = futures[-1]
            cid = uuid.uuid4().hex
            cids.append(cid)
            self._pending[cid] = future
            wait = min(ATTEMPT_TIMEOUT, remaining)
            with translate("snapshot request"):
                await self._channel.default_exchange.publish(
                    aio_pika.Message(
                        body,
                        correlation_id=cid,
                        reply_to=queue.name,
                        expiration=wait,
                        content_type="application/json",
                    ),
                    routing_key=c.rpc_queue(self._namespace),
                )
            async with asyncio.timeout(wait):
                reply = await asyncio.shield(future)
            if reply.get("error") == "rebuilding":
                # what the partition holds now is not the registry's answer: wait for it
                futures.append(loop.create_future())
                await asyncio.sleep(min(NOT_READY_PAUSE, max(0.0, deadline - loop.time())))
                raise _NotReady(reply.get("detail"))
            return reply

        try:
            reply = await retrying(
                attempt,
                what=f"snapshot request ({request.op})",
                log=log,
                backoff=RESEND,
                retry_on=(TimeoutError, _NotReady),
                deadline=timeout,
                level=logging.DEBUG,  # a resend is routine: a worker was busy or going away
            )
        except _NotReady as exc:
            raise RequestTimeout(f"no answer within {timeout}s: {exc}") from None
        except TimeoutError:
            raise RequestTimeout(
                f"no worker answered within {timeout}s "
                f"(is `busreg worker` running for namespace {self._namespace!r}?)"
            ) from None
        finally:
            for cid in cids:
                self._pending.pop(cid, None)
        if "error" in reply:
            detail = reply.get("detail")
            raise BusregError(f"worker refused the request: {reply['error']}: {detail}")
        return reply

    async def snapshot(self, service: str, timeout: float) -> Snapshot:
        reply = await self.call(SnapshotRequest(op="snapshot", service=service), timeout)
        return Snapshot.model_validate(reply)

    async def services(self, timeout: float) -> list[dict[str, Any]]:
        reply = await self.call(SnapshotRequest(op="services"), timeout)
        rows: list[dict[str, Any]] = reply["services"]
        return rows
