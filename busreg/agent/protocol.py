"""The agent's wire protocol: one JSON object per line, over a Unix socket. Pure; no I/O.

One connection per instance. The first line registers it; the agent replies with one line;
then the connection stays open for as long as the instance lives::

    → {"op": "register", "service": "inventory", "address": "10.0.0.7:8080",
       "instance_id": "inv-1", "zone": "eu-1a", "metadata": {"version": "2.1"}}
    ← {"ok": true, "service": "inventory", "instance_id": "inv-1", "ttl": 3.0, "interval": 1.0}
    → {"op": "update", "status": "OUT_OF_SERVICE"}
    ← {"ok": true}
    → {"op": "deregister"}
    ← {"ok": true}                       (and the agent closes the connection)

A connection that closes without ``deregister`` (the process died, or exited without
saying so) deregisters the instance at once. A refused request gets ``{"ok": false,
"error": "..."}`` with one line saying why; a refused registration also closes.
"""

from __future__ import annotations

from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from busreg.wire.models import InstanceStatus, validation_message

__all__ = ["MAX_LINE", "AgentReply", "AgentRequest", "ProtocolError", "encode", "parse"]

#: Longest request line: a registration with its metadata is well under this.
MAX_LINE = 64 * 1024


class ProtocolError(ValueError):
    """A line that is not a valid request (its message is the reply's ``error``)."""


class AgentRequest(BaseModel):
    """One request line. ``op="register"`` needs ``service`` and ``address``; the other
    fields are ``Registry.register``'s (defaults from the agent's settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["register", "update", "deregister"]
    service: str | None = None
    address: str | None = None
    instance_id: str | None = None
    zone: str | None = None
    status: InstanceStatus | None = None
    metadata: dict[str, str] | None = None
    ttl: float | None = Field(None, gt=0)
    interval: float | None = Field(None, gt=0)


class AgentReply(BaseModel):
    """One reply line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ok: bool
    error: str | None = None
    service: str | None = None
    instance_id: str | None = None
    ttl: float | None = None
    interval: float | None = None


def parse(line: bytes) -> AgentRequest:
    """A request from one line; ProtocolError says what is wrong."""
    try:
        return AgentRequest.model_validate_json(line)
    except ValidationError as exc:
        raise ProtocolError(validation_message(exc, where="request")) from None


def encode(message: AgentRequest | AgentReply) -> bytes:
    """One line: the JSON without unset fields, and a newline."""
    return orjson.dumps(message.model_dump(mode="json", exclude_none=True)) + b"\n"
