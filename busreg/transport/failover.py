"""An AMQP connection over the nodes of a cluster: aio-pika's robust connection, which on
loss reconnects to the next node instead of the one it lost.

aio-pika reconnects to the URL it was given, for ever: with that node dead, a watcher,
a worker's RPC server or a registrant's AMQP path would stay down as long as the node.
Here a lost connection, and every failed attempt, moves on to the next URL of
``amqp_url``; channels, consumers and declarations are restored on whichever node answers
(the robust channel's own recovery), because queues and exchanges are the cluster's, not
one node's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aio_pika import RobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

from busreg import constants as c

__all__ = ["FailoverConnection"]

log = logging.getLogger("busreg.connections")


class FailoverConnection(RobustConnection):
    """``FailoverConnection(["amqp://h1/", "amqp://h2/"], client_properties=...)``, then
    ``await conn.connect()``; used by ``busreg.transport.connections.connect_amqp``."""

    def __init__(self, urls: Sequence[str], **kwargs: Any) -> None:
        kwargs.setdefault("reconnect_interval", c.AMQP_RECONNECT_INTERVAL)
        super().__init__(URL(urls[0]), **kwargs)
        self._urls = [URL(u) for u in urls]
        self._at = 0

    def _next_node(self) -> None:
        if len(self._urls) > 1:
            self._at = (self._at + 1) % len(self._urls)
            self.url = self._urls[self._at]
            log.info("AMQP reconnects to %s:%s next", self.url.host, self.url.port)

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if not (self._close_called or self.is_closed):
            self._next_node()  # the node we were on may be gone: try the next one first
        await super()._on_connection_close(closing)

    # aio-pika's private reconnect step (RobustConnection.__connect_transport): the one
    # place every attempt goes through; pinned by the aio-pika range in pyproject.toml and
    # by tests/unit/test_failover_connection.py
    async def _RobustConnection__connect_transport(self) -> None:
        try:
            await super()._RobustConnection__connect_transport()  # type: ignore[misc]
        except CONNECTION_EXCEPTIONS:
            self._next_node()
            raise
