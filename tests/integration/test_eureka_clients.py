"""The real py-eureka-client against the gateway's Eureka API, on real servers.

A client process registers and heartbeats; a second one (discovery only) and a native
``ServiceView`` see it; it registers again by itself after the instance is removed behind
its back (404 → register), and stays registered when Redis loses the namespace's state;
its ``do_service`` reaches a natively registered HTTP server; a cancel and a SIGKILLed
client are announced (the latter at its lease + at most 1 s). Also measures the figures
in docs/eureka.md (printed with -s).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from busreg import Registry
from busreg.client.revisions import Change
from busreg.server.store import PartitionStore
from busreg.server.worker import Worker
from busreg.transport.connections import connect_redis
from busreg.wire.models import DeltaKind, Deregister

from .helpers import log_tail, stop_process
from .test_eureka_api import adopted, body_of, eureka_gateway, registration

pytestmark = pytest.mark.servers

#: A py-eureka-client process driven by JSON lines on stdin; answers on stdout.
CLIENT = """
import asyncio, json, os, sys
import py_eureka_client.eureka_client as ec

async def main():
    cfg = json.loads(sys.argv[1])
    client = ec.EurekaClient(
        eureka_server=cfg["server"], app_name=cfg["app"], instance_id=cfg.get("id", ""),
        instance_host="127.0.0.1", instance_ip="127.0.0.1", instance_port=cfg.get("port", 9090),
        renewal_interval_in_secs=cfg.get("renewal", 1), duration_in_secs=cfg.get("duration", 3),
        should_register=cfg.get("register", True), should_discover=cfg.get("discover", True),
    )
    await client.start()
    print(json.dumps({"started": True}), flush=True)
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return
        cmd = json.loads(line)
        if cmd["op"] == "apps":
            apps = client.applications
            out = {a.name: sorted(i.instanceId for i in a.instances) for a in apps.applications}
            print(json.dumps({"apps": out}), flush=True)
        elif cmd["op"] == "call":
            try:
                body = await client.do_service(cmd["app"], cmd["path"], timeout=3)
                print(json.dumps({"body": body}), flush=True)
            except Exception as exc:
                print(json.dumps({"error": repr(exc)}), flush=True)
        elif cmd["op"] == "stop":
            # the client's cancel request (py_eureka_client.eureka_basic.cancel, what its
            # stop() sends last), then the process ends, as a service's shutdown does. Not
            # stop() itself: in py-eureka-client 0.13 it hangs now and then (its heartbeat
            # thread and the caller share state across event loops), seen 2 runs in 5 here
            await ec.cancel(cfg["server"], cfg["app"].upper(), cfg["id"])
            print(json.dumps({"stopped": True}), flush=True)
            os._exit(0)

asyncio.run(main())
"""


class EurekaClient:
    """One py-eureka-client process."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    async def ask(self, op: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        self.proc.stdin.flush()
        return await self.answer(timeout)

    async def answer(self, timeout: float = 15.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = await asyncio.to_thread(self.proc.stdout.readline)
                if not line:
                    raise AssertionError(f"eureka client exited:\n{log_tail(self.log)}")
                if line.startswith(b"{"):  # py-eureka-client logs to stdout too
                    answer: dict[str, Any] = json.loads(line)
                    return answer


@asynccontextmanager
async def eureka_client(server: str, log: Path, **cfg: Any) -> AsyncIterator[EurekaClient]:
    cmd = [sys.executable, "-c", CLIENT, json.dumps({"server": server, **cfg})]
    proc = await asyncio.to_thread(_spawn_client, cmd, log)
    client = EurekaClient(proc, log)
    try:
        assert await client.answer() == {"started": True}
        yield client
    finally:
        await asyncio.to_thread(stop_process, proc, signal.SIGKILL)


def _spawn_client(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUSREG_")}
    with open(log, "ab") as err:  # the child keeps its own descriptor
        return subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err
        )


async def next_change(
    stream: AsyncIterator[Change], kind: DeltaKind, iid: str, timeout: float
) -> Change:
    async with asyncio.timeout(timeout):
        async for change in stream:
            if change.kind is kind and change.instance_id == iid:
                return change
    raise AssertionError("the change stream ended")


async def until_apps(client: EurekaClient, app: str, ids: list[str], timeout: float) -> None:
    """Ask the client's local registry until ``app`` has exactly ``ids`` (the client
    refreshes every renewal interval: another process, no notification to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        apps = (await client.ask("apps"))["apps"]
        if apps.get(app, []) == ids:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{app} is {apps.get(app)} in the client, not {ids}")
        await asyncio.sleep(0.1)  # poll interval of another process's state


async def test_py_eureka_client(
    busreg_worker: Worker, busreg_registry: Registry, tmp_path: Path
) -> None:
    settings = busreg_registry.settings
    view = await busreg_registry.watch("orders-py")
    changes = view.changes()
    echo = await start_echo()
    try:
        native = await busreg_registry.register(
            "echo-svc", address=f"127.0.0.1:{echo.port}", instance_id="echo-1"
        )
        # a registers and heartbeats; b only discovers
        async with (
            eureka_gateway(settings, tmp_path / "gw.log") as gw,
            eureka_client(gw.url, tmp_path / "a.log", app="orders-py", id="a-1", port=18080) as a,
            eureka_client(gw.url, tmp_path / "b.log", register=False, app="x") as b,
        ):
            added = await next_change(changes, DeltaKind.ADDED, "a-1", timeout=10)
            assert added.instance.address == "127.0.0.1:18080"
            assert added.instance.ttl == 3.0
            # renewals keep it past two lease durations (nothing expires meanwhile)
            with pytest.raises(TimeoutError):
                await next_change(changes, DeltaKind.REMOVED, "a-1", timeout=7)
            # discovered by a second py-eureka-client
            await until_apps(b, "ORDERS-PY", ["a-1"], timeout=10)
            # its do_service reaches the natively registered server
            await until_apps(b, "ECHO-SVC", ["echo-1"], timeout=10)
            assert await b.ask("call", app="ECHO-SVC", path="/hello") == {
                "body": "hello from echo-1 /hello"
            }
            # removed behind its back: its next renewal is 404, and it registers again
            instance = view.instances["a-1"]
            publisher = await busreg_registry._ingest()
            await publisher.publish_until_confirmed(
                Deregister(
                    service="orders-py",
                    instance_id="a-1",
                    incarnation=instance.incarnation,
                    seq=time.time_ns() // 1000 + 1_000_000,
                ),
                5.0,
            )
            # deadlines, not waits: a loaded CI machine may take a few renewal intervals
            gone = await next_change(changes, DeltaKind.REMOVED, "a-1", timeout=10)
            back = await next_change(changes, DeltaKind.ADDED, "a-1", timeout=10)
            assert back.instance.incarnation > instance.incarnation
            assert gone.reason == "deregistered"
            # Redis loses every key of the namespace: the worker rebuilds from the stream
            # (a new epoch), and the Eureka client, which did nothing, is still registered
            old_epoch = view.epoch
            redis = await connect_redis(settings)
            try:
                await PartitionStore(redis, settings.namespace).purge(settings.partitions)
            finally:
                await redis.aclose()
            await view.wait_for(lambda i: view.epoch != old_epoch and "a-1" in i, timeout=20)
            await until_apps(b, "ORDERS-PY", ["a-1"], timeout=10)
            # a cancel (py-eureka-client's stop: a DOWN registration, then DELETE)
            assert await a.ask("stop") == {"stopped": True}
            removed = await next_change(changes, DeltaKind.REMOVED, "a-1", timeout=10)
            assert removed.reason == "deregistered"
            await until_apps(b, "ORDERS-PY", [], timeout=10)
        await native.deregister()
    finally:
        await changes.aclose()
        echo.close()


async def test_sigkilled_client_expires_at_its_lease(
    busreg_worker: Worker, busreg_registry: Registry, tmp_path: Path
) -> None:
    """A SIGKILLed client (renewal 1 s, lease 3 s) is removed within lease + 1 s."""
    view = await busreg_registry.watch("killed-py")
    changes = view.changes()
    figures: list[float] = []
    try:
        async with eureka_gateway(busreg_registry.settings, tmp_path / "gw.log") as gw:
            for n in range(3):
                iid = f"k-{n}"
                async with eureka_client(
                    gw.url, tmp_path / f"{iid}.log", app="killed-py", id=iid, port=18100 + n
                ) as client:
                    await next_change(changes, DeltaKind.ADDED, iid, timeout=10)
                    killed = time.monotonic()
                    client.proc.send_signal(signal.SIGKILL)
                    removed = await next_change(changes, DeltaKind.REMOVED, iid, timeout=10)
                    figures.append(time.monotonic() - killed)
                    assert removed.reason == "expired"
    finally:
        await changes.aclose()
    print(f"\nEUREKA-FIGURE sigkill->removed (lease 3 s): {[round(f, 2) for f in figures]}")
    assert max(figures) <= 3.0 + 1.0


async def test_latency_figures(
    busreg_worker: Worker, busreg_registry: Registry, tmp_path: Path
) -> None:
    """The figures of docs/eureka.md: a Eureka register → a native watcher's view, and a
    native register → visible in /eureka/apps/delta (the client's delta poll)."""
    view = await busreg_registry.watch("lat-eureka")
    to_native: list[float] = []
    to_delta: list[float] = []
    async with (
        eureka_gateway(busreg_registry.settings, tmp_path / "gw.log") as gw,
        httpx.AsyncClient(timeout=10.0) as http,
    ):
        for n in range(200):
            iid = f"e-{n}"
            body, ctype = body_of(registration("lat-eureka", iid, 20000 + n), "json")
            began = time.perf_counter()
            post = asyncio.create_task(
                http.post(f"{gw.url}/apps/LAT-EUREKA", content=body, headers=ctype)
            )
            await view.wait_for(lambda now, i=iid: i in now, timeout=5)
            to_native.append(time.perf_counter() - began)
            assert (await post).status_code == 204
        first = await busreg_registry.register(
            "lat-native", address="127.0.0.1:30000", instance_id="n-0"
        )
        await adopted(http, gw.url, "lat-native")
        for n in range(1, 51):
            iid = f"n-{n}"
            began = time.perf_counter()
            await busreg_registry.register(
                "lat-native", address=f"127.0.0.1:{30000 + n}", instance_id=iid
            )
            while True:
                r = await http.get(f"{gw.url}/apps/delta", headers={"accept": "application/json"})
                apps = orjson.loads(r.content)["applications"]["application"]
                ids = {i["instanceId"] for a in apps for i in a["instance"]}
                if iid in ids:
                    break
            to_delta.append(time.perf_counter() - began)
        await first.deregister()

    def pct(values: list[float], q: float) -> float:
        return round(sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000, 1)

    print(
        f"\nEUREKA-FIGURE eureka-register->native-view ms: p50={pct(to_native, 0.5)} "
        f"p99={pct(to_native, 0.99)} max={round(max(to_native) * 1000, 1)} n={len(to_native)}"
        f"\nEUREKA-FIGURE native-register->delta ms: p50={pct(to_delta, 0.5)} "
        f"p99={pct(to_delta, 0.99)} mean={round(statistics.mean(to_delta) * 1000, 1)} "
        f"n={len(to_delta)}"
    )
    assert pct(to_native, 0.5) < 1000


class Echo:
    def __init__(self, server: asyncio.Server) -> None:
        self.server = server
        self.port: int = server.sockets[0].getsockname()[1]

    def close(self) -> None:
        self.server.close()


async def start_echo() -> Echo:
    """A tiny HTTP server: answers ``hello from echo-1 <path>``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        path = request.split(b" ", 2)[1].decode()
        body = f"hello from echo-1 {path}".encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    return Echo(await asyncio.start_server(handle, "127.0.0.1", 0))
