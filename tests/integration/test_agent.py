"""``busreg agent``: local instances register over a Unix socket, their leases are renewed
by the agent in batches, and an instance whose process is gone is removed at once (its
socket closed), not after its TTL."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import pytest

from busreg import DeltaKind, Registry, Settings
from busreg.agent import Agent, AgentClient, AgentRequest
from busreg.errors import ConfigurationError
from busreg.testing import running_worker

from .helpers import settings_env, spawn_logged, stop_process

pytestmark = [pytest.mark.servers, pytest.mark.busreg(partitions=2)]

#: long enough that no removal seen in these tests can be an expiry
TTL = 30.0


async def _removed(changes: object, instance_id: str) -> str | None:
    async with asyncio.timeout(10):
        async for change in changes:  # type: ignore[attr-defined]
            if change.kind is DeltaKind.REMOVED and change.instance_id == instance_id:
                return str(change.reason)
    return None


async def test_a_dead_instance_is_removed_at_once_and_the_others_stay(
    busreg_namespace: Settings, tmp_path: Path
) -> None:
    settings = busreg_namespace
    path = str(tmp_path / "agent.sock")
    async with (
        running_worker(settings),
        Agent(settings, path) as agent,
        Registry(settings) as watcher,
    ):
        view = await watcher.watch("agented", resync_interval=None)
        changes = view.changes()
        clients = [AgentClient(path) for _ in range(3)]
        for n, client in enumerate(clients):
            await client.__aenter__()
            reply = await client.register(
                service="agented", address=f"127.0.0.1:{9100 + n}", instance_id=f"a{n}", ttl=TTL
            )
            assert (reply.ok, reply.instance_id, reply.ttl) == (True, f"a{n}", TTL)
        await view.wait_for(lambda i: set(i) == {"a0", "a1", "a2"}, timeout=10)
        # a0's process dies: the kernel closes its socket, with no word to the agent
        assert clients[0]._writer is not None
        clients[0]._writer.transport.abort()
        assert await _removed(changes, "a0") == "deregistered"
        # a1 changes its status and leaves politely; a2 stays
        assert (await clients[1].request(AgentRequest(op="update", status="DOWN"))).ok
        await view.wait_for(lambda i: i["a1"].status == "DOWN", timeout=10)
        await clients[1].__aexit__(None, None, None)
        assert await _removed(changes, "a1") == "deregistered"
        assert set(view.instances) == {"a2"}
        assert set(agent.live) == {"agented/a2"}
        # a bad request gets a reason, not a hang
        reply = await clients[2].request(AgentRequest(op="register", service="x"))
        assert not reply.ok
        assert "registered already" in (reply.error or "")
        await clients[2].__aexit__(None, None, None)


async def test_a_refused_registration_says_why(busreg_namespace: Settings, tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    async with Agent(busreg_namespace, path):
        async with AgentClient(path) as client:
            with pytest.raises(ConfigurationError, match="address"):
                await client.register(service="agented", address="no-port")
        # a second agent on the same socket is refused; a stale socket file is taken over
        with pytest.raises(ConfigurationError, match="another agent"):
            async with Agent(busreg_namespace, path):
                pass
    # the socket file of an agent that died (bound, nobody listening) is taken over
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    async with Agent(busreg_namespace, path), AgentClient(path) as client:
        assert (await client.register(service="agented", address="127.0.0.1:1")).ok


async def test_register_through_the_agent_from_the_cli_and_kill_it(
    busreg_namespace: Settings, tmp_path: Path
) -> None:
    settings = busreg_namespace
    path = str(tmp_path / "agent.sock")
    env = settings_env(settings)
    async with (
        running_worker(settings),
        Agent(settings, path),
        Registry(settings) as watcher,
    ):
        view = await watcher.watch("agent-cli", resync_interval=None)
        changes = view.changes()
        cmd = [
            sys.executable, "-m", "busreg", "register", "agent-cli",
            "--address", "127.0.0.1:9200", "--instance-id", "cli-1",
            "--ttl", str(TTL), "--agent", path,
        ]  # fmt: skip
        proc = spawn_logged(cmd, env, tmp_path / "register.log")
        try:
            await view.wait_for(lambda i: "cli-1" in i, timeout=20)
            stop_process(proc, signal.SIGKILL)
            assert await _removed(changes, "cli-1") == "deregistered"
        finally:
            stop_process(proc, signal.SIGKILL)
