"""``busreg agent`` and ``busreg register --agent``: the command-line ends of the agent."""

from __future__ import annotations

import asyncio
from typing import Any

from busreg.agent.client import hold
from busreg.agent.protocol import AgentReply
from busreg.agent.server import Agent
from busreg.settings import Settings
from busreg.tasks import until_signal

__all__ = ["register_through_agent", "run_agent"]


async def run_agent(settings: Settings, path: str) -> int:
    """Serve local instances on ``path`` until SIGTERM/SIGINT (then deregister them)."""
    async with Agent(settings, path) as agent:
        print(f"agent serving {path}", flush=True)
        await until_signal(agent.run, agent.stop)
    return 0


async def register_through_agent(path: str, service: str, fields: dict[str, Any]) -> int:
    """Hold one registration through the agent at ``path`` until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    request = {"service": service, **{k: v for k, v in fields.items() if v is not None}}
    print(f"registering {service} through the agent at {path}; Ctrl-C to deregister", flush=True)
    reply: AgentReply | None = None

    async def run() -> None:
        nonlocal reply
        reply = await hold(path, request, stop)

    await until_signal(run, stop.set)
    if reply is not None:
        print(f"deregistered {reply.service}/{reply.instance_id}", flush=True)
    return 0
