"""Registering through a local agent (``busreg register --agent``, or from Python).

    async with AgentClient("/run/busreg/agent.sock") as agent:
        reply = await agent.register(service="inventory", address="10.0.0.7:8080")
        await agent.closed()          # returns if the agent went away

The instance lives as long as the connection: leaving the ``async with`` (or the process
dying) deregisters it. ``hold`` keeps an instance registered across agent restarts: it
connects again, with back-off, and registers the same instance again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Self

from busreg.agent.protocol import MAX_LINE, AgentReply, AgentRequest, encode
from busreg.backoff import Backoff
from busreg.errors import BusregError, ClosedError, ConfigurationError, ConnectionFailed

__all__ = ["AgentClient", "hold"]

log = logging.getLogger("busreg.agent")

#: How long a request waits for the agent's reply (a registration is confirmed by the
#: broker first, a millisecond or two, or its confirm timeout when the broker is away).
REPLY_TIMEOUT = 15.0
RECONNECT = Backoff(first=0.2, cap=5.0)


class AgentClient:
    """One connection to the agent: one instance."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        if self._writer is not None:
            raise ClosedError("an AgentClient can be entered once")
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(
                self.path, limit=MAX_LINE
            )
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ConnectionFailed(f"no agent at {self.path} ({exc.strerror})") from exc
        return self

    async def __aexit__(self, *exc: object) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            with contextlib.suppress(BusregError):  # closing deregisters it anyway
                await self.request(AgentRequest(op="deregister"))
            writer.close()

    async def request(self, request: AgentRequest) -> AgentReply:
        """Send one request and return the agent's reply (ok or not)."""
        if self._reader is None or self._writer is None:
            raise ClosedError("use `async with AgentClient(...)`")
        async with self._lock:
            try:
                self._writer.write(encode(request))
                async with asyncio.timeout(REPLY_TIMEOUT):
                    await self._writer.drain()
                    line = await self._reader.readline()
            except (ConnectionError, TimeoutError) as exc:
                raise ConnectionFailed(f"agent at {self.path}: {exc!r}") from exc
        if not line:
            raise ConnectionFailed(f"agent at {self.path} closed the connection")
        return AgentReply.model_validate_json(line)

    async def register(self, **fields: Any) -> AgentReply:
        """Register this connection's instance (``Registry.register``'s fields)."""
        reply = await self.request(AgentRequest(op="register", **fields))
        if not reply.ok:
            raise ConfigurationError(f"the agent refused the registration: {reply.error}")
        return reply

    async def closed(self) -> None:
        """Return when the agent closes the connection (it stopped, or went away)."""
        if self._reader is None:
            raise ClosedError("use `async with AgentClient(...)`")
        async with self._lock:
            while await self._reader.read(MAX_LINE):
                pass


async def hold(path: str, fields: dict[str, Any], stop: asyncio.Event) -> AgentReply | None:
    """Keep one instance registered through the agent at ``path`` until ``stop`` is set,
    connecting again (with back-off) whenever the agent goes away. A refused registration
    is raised at once (ConfigurationError): trying again would not change it. Returns the
    last reply (None if the agent never answered)."""
    reply: AgentReply | None = None
    failures = 0
    while not stop.is_set():
        try:
            async with AgentClient(path) as agent:
                reply = await agent.register(**fields)
                failures = 0
                log.info("registered %s/%s through %s", reply.service, reply.instance_id, path)
                gone = asyncio.ensure_future(agent.closed())
                halt = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait([gone, halt], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in (gone, halt):
                        task.cancel()
                    await asyncio.gather(gone, halt, return_exceptions=True)
                if stop.is_set():
                    return reply
                log.warning("agent at %s went away; registering again", path)
        except ConnectionFailed as exc:
            delay = RECONNECT.delay(failures)
            failures += 1
            if failures == 1 or failures % 10 == 0:
                log.warning("agent at %s: %s; again in %.1fs", path, exc, delay)
            try:
                async with asyncio.timeout(delay):
                    await stop.wait()
            except TimeoutError:
                pass
    return reply
