"""The agent: one Registry for every local instance, served over a Unix socket.

Instances register through the socket (protocol.py); their heartbeats are the agent's, so
a host's leases are renewed in one batched heartbeat per partition and interval on one
broker connection, whatever number of instances and languages the host runs. An
instance's connection is its liveness: when it closes, the instance is deregistered at
once (a process that dies closes its sockets; the kernel does it even on SIGKILL).

Stopping the agent (SIGTERM) deregisters every local instance: as with Consul's agent,
a host that leaves takes its services with it. Clients see their connection close;
``AgentClient`` connects again and registers again, so an agent restart costs a moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from typing import Self

from busreg.agent.protocol import MAX_LINE, AgentReply, AgentRequest, ProtocolError, encode, parse
from busreg.client.registration import Registration
from busreg.client.registry import Registry
from busreg.errors import BusregError, ClosedError, ConfigurationError
from busreg.settings import Settings
from busreg.tasks import cancel_until_done

__all__ = ["Agent"]

log = logging.getLogger("busreg.agent")

#: A new connection must send its registration within this long (then it is closed).
REGISTER_TIMEOUT = 10.0


class Agent:
    """``async with Agent(settings, path) as agent: await agent.run()``; ``agent.stop()``
    ends it (safe from a signal handler)."""

    def __init__(self, settings: Settings, path: str) -> None:
        self.settings = settings
        self.path = path
        self._registry = Registry(settings, name=f"busreg-agent {socket.gethostname()}")
        self._server: asyncio.AbstractServer | None = None
        self._stopping = asyncio.Event()
        self._handlers: set[asyncio.Task[None]] = set()
        self._opened = False
        #: local instances registered now, and since start (metrics, tests)
        self.live: dict[str, Registration] = {}
        self.registered = 0

    async def __aenter__(self) -> Self:
        if self._opened:
            raise ClosedError("an Agent can be entered once; create a new one")
        self._opened = True
        await _claim_socket(self.path)
        await self._registry.__aenter__()
        try:
            self._server = await asyncio.start_unix_server(
                self._on_client, path=self.path, limit=MAX_LINE
            )
        except BaseException:
            await self._registry.__aexit__(None, None, None)
            raise
        log.info("agent listening on %s", self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()  # no new instances
        try:
            # every local instance deregistered (confirmed), as the Registry closes
            await self._registry.__aexit__(None, None, None)
        finally:
            await cancel_until_done(list(self._handlers))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Serve until ``stop()``."""
        await self._stopping.wait()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve_instance(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the instance went away; _serve_instance deregistered it
        except Exception:  # a bug here must not take the agent (or other instances) down
            log.exception("agent: connection handler failed")
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _serve_instance(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            async with asyncio.timeout(REGISTER_TIMEOUT):
                line = await reader.readline()
        except TimeoutError:
            await _reply(writer, AgentReply(ok=False, error="no registration within 10s"))
            return
        if not line:
            return
        try:
            request = parse(line)
            if request.op != "register":
                raise ProtocolError(f"op: the first request must register, not {request.op!r}")
            reg = await self._register(request)
        except (ProtocolError, ConfigurationError) as exc:
            await _reply(writer, AgentReply(ok=False, error=str(exc)))
            return
        except BusregError as exc:
            await _reply(writer, AgentReply(ok=False, error=f"registration failed: {exc}"))
            return
        key = f"{reg.service}/{reg.instance_id}"
        self.live[key] = reg
        why = "its connection closed"
        try:
            await _reply(
                writer,
                AgentReply(
                    ok=True,
                    service=reg.service,
                    instance_id=reg.instance_id,
                    ttl=reg.ttl,
                    interval=reg.interval,
                ),
            )
            why = await self._follow(reader, writer, reg)
        finally:
            self.live.pop(key, None)
            if reg.active:  # closed, or the agent stops: remove it now, not after its TTL
                with contextlib.suppress(BusregError):
                    await reg.deregister()
        log.info("agent: %s deregistered (%s)", key, why)

    async def _register(self, request: AgentRequest) -> Registration:
        if request.service is None or request.address is None:
            raise ProtocolError("register needs service and address")
        reg = await self._registry.register(
            request.service,
            address=request.address,
            instance_id=request.instance_id,
            zone=request.zone or "default",
            status=request.status or "UP",
            metadata=request.metadata,
            ttl=request.ttl,
            interval=request.interval,
        )
        self.registered += 1
        log.info("agent: %s/%s registered", reg.service, reg.instance_id)
        return reg

    async def _follow(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reg: Registration
    ) -> str:
        """Serve updates until the instance deregisters (returns why) or goes away."""
        while True:
            line = await reader.readline()
            if not line:
                return "its connection closed"
            try:
                request = parse(line)
                if request.op == "deregister":
                    await reg.deregister()
                    await _reply(writer, AgentReply(ok=True))
                    return "it asked"
                if request.op == "register":
                    raise ProtocolError("op: this connection has registered already")
                await reg.update(status=request.status, metadata=request.metadata)
                await _reply(writer, AgentReply(ok=True))
            except ProtocolError as exc:
                await _reply(writer, AgentReply(ok=False, error=str(exc)))
            except BusregError as exc:
                await _reply(writer, AgentReply(ok=False, error=f"update failed: {exc}"))


async def _reply(writer: asyncio.StreamWriter, reply: AgentReply) -> None:
    writer.write(encode(reply))
    await writer.drain()


async def _claim_socket(path: str) -> None:
    """Remove a stale socket file left by an agent that died; refuse if one is serving."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigurationError(f"{path} exists and is not a socket")
    try:
        _, writer = await asyncio.open_unix_connection(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: left by an agent that died
        return
    writer.close()
    raise ConfigurationError(f"another agent is serving {path}")
