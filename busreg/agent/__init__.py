"""``busreg agent``: one process per host that local instances register with.

As Consul's agent: instances of any language register over a local Unix socket instead of
each holding broker connections, and the agent renews every local lease in one batched
heartbeat per partition and interval (contract v2). Liveness is the connection itself: an
instance whose process is gone (its socket closed) is deregistered at once, not after its
TTL.

    busreg agent --socket /run/busreg/agent.sock          # the agent
    busreg register inventory --address 10.0.0.7:8080 --agent /run/busreg/agent.sock

The protocol (``protocol.py``) is one JSON object per line; ``AgentClient`` speaks it for
Python and for ``busreg register --agent``.
"""

from busreg.agent.client import AgentClient
from busreg.agent.protocol import AgentReply, AgentRequest
from busreg.agent.server import Agent

__all__ = ["Agent", "AgentClient", "AgentReply", "AgentRequest"]
