"""The processes of the edge-routing tests (test_gateway_proxy.py): an instance (a small
ASGI app on uvicorn that registers itself with busreg and prints a JSON line once
registered) and, for the measurement, one gateway process routing a service.

    python -m tests.integration.proxy_servers serve <service> <instance-id>
    python -m tests.integration.proxy_servers gateway <service>...
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from busreg import Registry, Settings
from busreg.gateway.proxy import RouteProxy, RouteSettings

from .helpers import settings_env

ROOT = Path(__file__).resolve().parents[2]
#: Requests per second of the steady load of the SIGKILL test.
RATE = 100
CHUNK = 64 * 1024
#: The bytes of streamed bodies: a 64 KiB block, repeated.
BLOCK = bytes(range(256)) * (CHUNK // 256)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


# --- the instance process -----------------------------------------------------------------------


class InstanceApp:
    """What the tests call: echo, streamed upload/download, a slow endpoint, hit counters."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.received: dict[str, int] = {}
        self.releases: dict[str, asyncio.Event] = {}
        self.hits: dict[str, int] = {}
        self.keys: list[str | None] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        key = query.get("key", "")
        self.hits[path] = self.hits.get(path, 0) + 1
        if path == "/download":  # the first block, then the rest once /release was called
            release = self.releases.setdefault(key, asyncio.Event())
            await _start(send, 200, [(b"content-type", b"application/octet-stream")])
            size, sent = int(query["size"]), 0
            while sent < size:
                chunk = BLOCK[: min(CHUNK, size - sent)]
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
                if sent == len(chunk):
                    await release.wait()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if path == "/release":
            self.releases.setdefault(key, asyncio.Event()).set()
            await _json(send, {"released": key})
            return
        if path == "/received":
            await _json(send, {"bytes": self.received.get(key, 0)})
            return
        if path == "/hits":
            await _json(send, {"hits": self.hits, "keys": self.keys})
            return
        digest, size, more = hashlib.sha256(), 0, True
        while more:  # counted as it arrives: the upload test watches it grow
            message = await receive()
            chunk = message.get("body", b"")
            digest.update(chunk)
            size += len(chunk)
            self.received[key] = size
            more = message.get("more_body", False)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        if path == "/slow":
            self.keys.append(headers.get("idempotency-key"))
            await asyncio.sleep(float(query["delay"]))  # the slow service under test
        body = {
            "instance": self.instance_id,
            "method": scope["method"],
            "path": path,
            "raw_path": scope["raw_path"].decode(),
            "query": scope["query_string"].decode(),
            "headers": headers,
            "size": size,
            "sha256": digest.hexdigest(),
        }
        hop = [  # hop-by-hop headers a proxy must not pass on, and one end-to-end header
            (b"connection", b"x-hop-resp"),
            (b"x-hop-resp", b"secret"),
            (b"keep-alive", b"timeout=30"),
            (b"proxy-authenticate", b"Basic realm=x"),
            (b"trailer", b"x-sum"),
            (b"upgrade", b"h2c"),
            (b"x-instance", self.instance_id.encode()),
        ]
        await _json(send, body, hop)


async def _start(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _json(send: Send, body: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
    await _start(send, 200, headers + (extra or []))
    await send({"type": "http.response.body", "body": data, "more_body": False})


def listen() -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP
    # (proto 0 would leave Nagle on: 40 ms per keep-alive response, headers and body apart)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)  # connections wait in the backlog until uvicorn accepts them
    return sock


def uvicorn_server(app: Any, **options: Any) -> uvicorn.Server:
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False, **options)
    return uvicorn.Server(config)


async def serve(service: str, instance_id: str) -> None:
    sock = listen()
    port = sock.getsockname()[1]
    async with Registry(Settings(), name=f"{service} {instance_id}") as registry:
        await registry.register(service, address=f"127.0.0.1:{port}", instance_id=instance_id)
        print(json.dumps({"registered": time.time(), "port": port}), flush=True)
        await uvicorn_server(InstanceApp(instance_id)).serve(sockets=[sock])


async def gateway(services: list[str]) -> None:
    """One gateway process routing ``services`` (for the measurement)."""
    sock = listen()
    async with Registry(Settings(), name="busreg-gateway") as registry:
        proxy = RouteProxy(registry, Settings(), route=RouteSettings(services=services))
        await proxy.start()
        print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
        try:
            app = Starlette(routes=[Mount("/route", app=proxy)])
            # as `busreg gateway` serves: h11, whose header-size bound the gateway relies on
            await uvicorn_server(app, http="h11", proxy_headers=False).serve(sockets=[sock])
        finally:
            await proxy.close()


# --- the test side ------------------------------------------------------------------------------


@dataclass
class Child:
    """A child process printing JSON lines (instance or gateway)."""

    name: str
    proc: asyncio.subprocess.Process
    events: dict[str, Any] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.events['port']}"

    async def read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            try:
                self.events.update(json.loads(raw))
                self.ready.set()
            except ValueError:
                sys.stderr.write(f"[{self.name}] {raw.decode(errors='replace')}")

    async def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        if self.reader is not None:
            await self.reader


async def start_child(settings: Settings, *args: str) -> Child:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.proxy_servers",
        *args,
        cwd=ROOT,
        env=settings_env(settings),
        stdout=asyncio.subprocess.PIPE,
    )
    child = Child(" ".join(args), proc)
    child.reader = asyncio.create_task(child.read())
    try:
        async with asyncio.timeout(30):
            await child.ready.wait()
    except BaseException:
        await child.stop()
        raise
    return child


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        asyncio.run(serve(sys.argv[2], sys.argv[3]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "gateway":
        asyncio.run(gateway(sys.argv[2:]))
    else:
        sys.exit(
            "usage: python -m tests.integration.proxy_servers "
            "serve <service> <instance-id> | gateway <service>..."
        )
