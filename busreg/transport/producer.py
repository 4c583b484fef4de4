"""rstream's Producer without its 0.2 s pause on the first send to each stream.

To publish to a stream, rstream opens a *locator* connection, asks it for the stream's
leader, connects to the leader, and then closes the locator: ``Client.close`` ends with a
fixed ``asyncio.sleep(0.2)``, awaited on the send's path. So every new stream cost a send
~0.2 s: a fresh process's first ``register()`` returned after 243 ms, and its first
registration into each further partition after another 206 ms (measured here, RabbitMQ
3.10 on loopback).

Here the locator is kept for ``LOCATOR_LINGER`` seconds after its last use, so a process
that registers into several partitions at start asks the same connection, and then closed
off the send path, on a task of the producer's own that ``close()`` awaits. Nothing else
of rstream's behaviour changes (it is the same class; only this hook is replaced).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from rstream import Producer
from rstream.client import Client

__all__ = ["LOCATOR_LINGER", "QuickProducer"]

log = logging.getLogger("busreg.transport")

#: How long an unused locator connection stays open (seconds): long enough for a process
#: that starts by registering into several partitions, short enough that a long-lived
#: registrant does not hold a second stream connection it no longer needs.
LOCATOR_LINGER = 2.0


class QuickProducer(Producer):
    """``rstream.Producer`` whose locator connection is closed off the send path."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._linger: asyncio.Task[None] | None = None

    async def _close_locator_connection(self) -> None:
        # called by rstream right after every leader lookup: close later, not now
        client = self._default_client
        if client is None or (self._linger is not None and not self._linger.done()):
            return
        self._linger = asyncio.ensure_future(self._close_when_unused(client))

    async def _close_when_unused(self, client: Client) -> None:
        await asyncio.sleep(LOCATOR_LINGER)  # a linger timer, not synchronisation
        if self._default_client is not client:
            return  # replaced meanwhile (rstream found it dead): not ours to close
        if await client.get_stream_count() == 0:  # type: ignore[no-untyped-call]
            self._default_client = None
            try:
                await client.close()
            except Exception as exc:  # a dead locator: nothing to keep
                log.debug("locator close: %r", exc)

    async def close(self) -> None:
        linger, self._linger = self._linger, None
        if linger is not None:
            linger.cancel()
            # its error, if any, was logged there; a cancellation is ours
            await asyncio.gather(linger, return_exceptions=True)
        await super().close()  # closes every connection of the pool, the locator's too
