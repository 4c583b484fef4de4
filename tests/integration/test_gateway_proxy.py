"""Edge routing (``busreg.gateway.proxy.RouteProxy``) on real servers.

A worker process, instance processes (this module run as ``python -m
tests.integration.proxy_servers serve <service> <instance-id>``: a small ASGI app on
uvicorn that registers itself with busreg and prints a JSON line once registered), and the
proxy mounted under ``/route`` in a Starlette app served by ``uvicorn.Server`` in this
process. Requests go to the proxy over real sockets with httpx.

``BUSREG_PROXY_BENCH=1`` also runs ``test_measure_proxy_overhead``: latency through the
proxy against the instance directly, and requests/s through one gateway process (run as
``python -m tests.integration.proxy_servers gateway <service>``), with ``wrk`` when it
is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from busreg import InstanceStatus, Registry, Settings
from busreg.gateway.proxy import RouteProxy, RouteSettings

from .helpers import eventually, gateway_process, owners, spawn_worker, stop_process
from .proxy_servers import BLOCK, CHUNK, RATE, Child, listen, start_child, uvicorn_server

pytestmark = pytest.mark.servers


@pytest.fixture
def worker(busreg_namespace: Settings, tmp_path: Path) -> Any:
    proc = spawn_worker(busreg_namespace, "w1", tmp_path / "worker.log")
    yield proc
    stop_process(proc)


async def _owned(settings: Settings) -> None:
    await eventually(
        lambda: owners(settings),
        lambda o: all(o.values()),
        timeout=20,
        what="the worker owning every partition",
    )


@contextlib.asynccontextmanager
async def instances(settings: Settings, service: str, *ids: str) -> AsyncIterator[list[Child]]:
    await _owned(settings)
    children: list[Child] = []
    try:
        for instance_id in ids:
            children.append(await start_child(settings, "serve", service, instance_id))
        yield children
    finally:
        for child in children:
            await child.stop()


@contextlib.asynccontextmanager
async def running_proxy(
    settings: Settings, route: RouteSettings
) -> AsyncIterator[tuple[str, RouteProxy]]:
    """The proxy mounted under /route, served by uvicorn in this process."""
    sock = listen()
    async with Registry(settings, name="busreg-gateway") as registry:
        proxy = RouteProxy(registry, settings, route=route)
        await proxy.start()
        # proxy_headers=False: uvicorn would otherwise take the client address from the
        # X-Forwarded-For of a local client (forwarded_allow_ips defaults to 127.0.0.1)
        server = uvicorn_server(Starlette(routes=[Mount("/route", app=proxy)]), proxy_headers=False)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/route", proxy
        finally:
            server.should_exit = True
            await task
            await proxy.close()


async def _both_in_view(proxy: RouteProxy, service: str, ids: set[str]) -> None:
    view = await proxy.registry.watch(service)
    await view.wait_for(lambda i: ids <= set(i), timeout=15)


# --- tests --------------------------------------------------------------------------------------


async def test_no_failed_request_while_an_instance_is_sigkilled(
    busreg_namespace: Settings, worker: Any
) -> None:
    settings = busreg_namespace
    route = RouteSettings(services=["inventory"], connect_timeout=0.25, read_timeout=2.0)
    async with (
        instances(settings, "inventory", "inv-1", "inv-2") as (inv1, _inv2),
        running_proxy(settings, route) as (url, proxy),
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        await _both_in_view(proxy, "inventory", {"inv-1", "inv-2"})
        results: list[tuple[float, str]] = []
        running = True

        async def call() -> None:
            start = time.monotonic()
            try:
                response = await client.get("/inventory/items/1")
                response.raise_for_status()
                results.append((start, response.json()["instance"]))
            except Exception as exc:
                results.append((start, f"error: {exc!r}"))

        async def load() -> None:  # an open loop: a slow call does not slow the rate
            loop = asyncio.get_running_loop()
            next_at = loop.time()
            async with asyncio.TaskGroup() as tg:
                while running:
                    tg.create_task(call())
                    next_at += 1 / RATE
                    await asyncio.sleep(max(0.0, next_at - loop.time()))

        began = time.monotonic()
        runner = asyncio.create_task(load())
        await eventually(
            lambda: asyncio.sleep(0, len(results)),
            lambda n: n >= 2 * RATE,
            timeout=10,
            what="2 s of load",
        )
        killed_at = time.monotonic()
        inv1.proc.kill()  # the server and its registration: the lease expires after 2 s
        await inv1.proc.wait()
        view = await proxy.registry.watch("inventory")
        await view.wait_for(lambda i: "inv-1" not in i, timeout=15)
        expired = time.monotonic() - killed_at
        await eventually(
            lambda: asyncio.sleep(0, time.monotonic()),
            lambda now: now - began >= 6.0 and now - killed_at >= expired + 0.5,
            timeout=20,
            what="6 s of load",
        )
        running = False
        await runner
        stats = proxy.transport.stats

    failed = [r for r in results if r[1].startswith("error")]
    before = {r[1] for r in results if r[0] < killed_at}
    print(
        f"\n{len(results)} requests over {time.monotonic() - began:.1f}s at {RATE}/s; inv-1 "
        f"SIGKILLed, expired after {expired:.2f}s; {len(failed)} failed; {stats.retries} "
        f"retried, {stats.connect_failures} connect failures, {stats.read_failures} broken"
    )
    assert not failed, failed[:5]
    assert len(results) >= 5.5 * RATE
    assert before == {"inv-1", "inv-2"}, "both served before the kill"
    assert {r[1] for r in results[-RATE // 2 :]} == {"inv-2"}


async def test_busreg_gateway_route_serves_the_proxy_from_its_settings(
    busreg_namespace: Settings, worker: Any, tmp_path: Path
) -> None:
    """The CLI path: `busreg gateway --route` mounts the proxy under /route with its settings
    from BUSREG_GATEWAY__ROUTING__* (the listed service loaded at start)."""
    async with instances(busreg_namespace, "echo", "e-1") as _:
        routing = {"BUSREG_GATEWAY__ROUTING__SERVICES": '["echo"]'}
        async with (
            gateway_process(busreg_namespace, tmp_path / "gw.log", "--route", **routing) as gw,
            httpx.AsyncClient(timeout=5.0) as http,
        ):
            reply = await http.get(f"{gw.url}/route/echo/hello?x=1")
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert (body["instance"], body["path"], body["query"]) == ("e-1", "/hello", "x=1")
            assert body["headers"]["x-forwarded-prefix"] == "/route/echo"
            missing = await http.get(f"{gw.url}/route/nope/x")
            assert missing.status_code == 404
            assert "nope" in missing.json()["error"]


async def test_hop_by_hop_headers_and_x_forwarded(busreg_namespace: Settings, worker: Any) -> None:
    settings = busreg_namespace
    async with (
        instances(settings, "Inventory", "inv-1"),
        running_proxy(settings, RouteSettings(services=["Inventory"])) as (url, _proxy),
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        port = httpx.URL(url).port
        response = await client.post(
            "/Inventory/echo/a%2Fb/c?x=1&y=%20z",
            content=b"hello",
            headers={
                "Connection": "keep-alive, X-Hop-Req",
                "X-Hop-Req": "secret",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "Trailer": "X-Sum",
                "Upgrade": "h2c",
                "Proxy-Authorization": "Basic Zm9vOmJhcg==",
                "X-Forwarded-For": "6.6.6.6",
                "X-Forwarded-Host": "forged.example",
                "X-End-To-End": "kept",
            },
        )
        assert response.status_code == 200, response.text
        echo = response.json()
        sent = echo["headers"]
        for name in ("x-hop-req", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization"):
            assert name not in sent, (name, sent)
        assert sent.get("connection", "keep-alive").lower() == "keep-alive"  # httpx's own
        assert sent["x-end-to-end"] == "kept"
        assert sent["host"] == "Inventory"
        assert sent["x-forwarded-for"] == "127.0.0.1"  # the forged one is replaced
        assert sent["x-forwarded-proto"] == "http"
        assert sent["x-forwarded-host"] == f"127.0.0.1:{port}"
        assert sent["x-forwarded-prefix"] == "/route/Inventory"
        assert echo["raw_path"] == "/echo/a%2Fb/c", "the path goes on as the client encoded it"
        assert echo["query"] == "x=1&y=%20z"
        assert (echo["size"], echo["sha256"]) == (5, hashlib.sha256(b"hello").hexdigest())
        for name in ("x-hop-resp", "keep-alive", "proxy-authenticate", "trailer", "upgrade"):
            assert name not in response.headers, (name, response.headers)
        assert response.headers["x-instance"] == "inv-1"

        root = await client.get("/Inventory")  # the service's root: "/"
        assert root.json()["path"] == "/"


async def test_streams_a_large_body_both_ways(busreg_namespace: Settings, worker: Any) -> None:
    """5 MB each way. The instance answers the download's first 64 KiB and sends the rest
    only once the client, having received them through the proxy, says so; the client
    sends the upload's rest only once the instance has counted its first 64 KiB: a proxy
    that buffered whole bodies would deadlock both (failed by the timeout)."""
    settings = busreg_namespace
    size = 5 * 1024 * 1024 + 123
    expected = hashlib.sha256((BLOCK * (size // CHUNK + 1))[:size]).hexdigest()
    async with (
        instances(settings, "files", "f-1") as (instance,),
        running_proxy(settings, RouteSettings(services=["files"])) as (url, _proxy),
        httpx.AsyncClient(base_url=url, timeout=10) as client,
        httpx.AsyncClient(base_url=f"http://{instance.address}", timeout=10) as direct,
    ):
        async with asyncio.timeout(30):
            digest, got = hashlib.sha256(), 0
            async with client.stream("GET", f"/files/download?size={size}&key=d1") as response:
                assert response.status_code == 200
                released = False
                async for chunk in response.aiter_raw():
                    digest.update(chunk)
                    got += len(chunk)
                    if got >= CHUNK and not released:
                        released = True
                        (await direct.get("/release?key=d1")).raise_for_status()
            assert (got, digest.hexdigest()) == (size, expected)

            async def body() -> AsyncIterator[bytes]:
                yield BLOCK * 2  # more than the replay buffer (64 KiB): streamed
                await eventually(
                    lambda: direct.get("/received?key=u1"),
                    lambda r: r.json()["bytes"] >= 2 * CHUNK,
                    timeout=10,
                    what="the instance receiving the first blocks before the rest is sent",
                )
                rest = size - 2 * CHUNK
                while rest > 0:
                    yield BLOCK[: min(CHUNK, rest)]
                    rest -= CHUNK

            response = await client.post("/files/upload?key=u1", content=body())
            assert response.status_code == 200, response.text
            assert (response.json()["size"], response.json()["sha256"]) == (size, expected)


async def test_json_errors_say_what_failed(
    busreg_namespace: Settings, worker: Any, busreg_registry: Registry
) -> None:
    settings = busreg_namespace
    await _owned(settings)
    closed = []
    for _ in range(2):  # ports nobody listens on
        sock = listen()
        closed.append(sock.getsockname()[1])
        sock.close()
    for k, port in enumerate(closed):
        await busreg_registry.register("dead", address=f"127.0.0.1:{port}", instance_id=f"d-{k}")
    await busreg_registry.register(
        "idle", address="127.0.0.1:9", instance_id="i-1", status=InstanceStatus.OUT_OF_SERVICE
    )
    view = await busreg_registry.watch("dead")
    await view.wait_for(lambda i: len(i) == 2, timeout=10)
    await (await busreg_registry.watch("idle")).wait_for(lambda i: "i-1" in i, timeout=10)
    async with (
        running_proxy(settings, RouteSettings()) as (url, _proxy),
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        unknown = await client.get("/nosuch/x")
        assert unknown.status_code == 404
        assert unknown.json() == {"error": "unknown service: nosuch", "service": "nosuch"}
        assert unknown.headers["content-type"] == "application/json"

        no_route = await client.get("/")
        assert no_route.status_code == 404
        assert "no route" in no_route.json()["error"]

        idle = await client.get("/idle/x")
        assert idle.status_code == 503
        assert idle.json()["error"] == "no instance available"
        assert idle.json()["service"] == "idle"
        assert "1 registered, 0 UP" in idle.json()["detail"]

        dead = await client.get("/dead/x")
        assert dead.status_code == 502
        body = dead.json()
        assert body["error"] == "all attempts failed"
        assert body["service"] == "dead"
        assert {a["instance"] for a in body["attempts"]} == {"d-0", "d-1"}
        assert {a["address"] for a in body["attempts"]} == {f"127.0.0.1:{p}" for p in closed}
        assert all(a["error"].startswith("ConnectError") for a in body["attempts"]), body


async def test_post_is_retried_only_with_an_idempotency_key(
    busreg_namespace: Settings, worker: Any
) -> None:
    settings = busreg_namespace
    route = RouteSettings(services=["slow"], connect_timeout=0.5, read_timeout=0.5)
    async with (
        instances(settings, "slow", "s-1", "s-2") as children,
        running_proxy(settings, route) as (url, proxy),
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        await _both_in_view(proxy, "slow", {"s-1", "s-2"})

        async def seen() -> list[str | None]:
            keys: list[str | None] = []
            for child in children:
                async with httpx.AsyncClient(base_url=f"http://{child.address}") as direct:
                    keys += (await direct.get("/hits")).json()["keys"]
            return keys

        plain = await client.post("/slow/slow?delay=3", content=b"order-1")
        assert plain.status_code == 502
        body = plain.json()
        assert body["error"] == "all attempts failed"
        assert len(body["attempts"]) == 1
        assert body["attempts"][0]["error"].startswith("ReadTimeout")
        assert "POST not retried" in body["detail"]
        assert await seen() == [None], "sent once, to one instance"

        keyed = await client.post(
            "/slow/slow?delay=3", content=b"order-2", headers={"Idempotency-Key": "k-42"}
        )
        assert keyed.status_code == 502
        assert len(keyed.json()["attempts"]) == 2, "retried on the next server"
        assert {a["instance"] for a in keyed.json()["attempts"]} == {"s-1", "s-2"}
        assert sorted(await seen(), key=str) == sorted([None, "k-42", "k-42"], key=str)


# --- measurement (BUSREG_PROXY_BENCH=1) ---------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _latencies(client: httpx.AsyncClient, url: str, n: int) -> list[float]:
    for _ in range(200):  # warm the connections and the code paths
        (await client.get(url)).raise_for_status()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        (await client.get(url)).raise_for_status()
        out.append((time.perf_counter() - start) * 1000)
    return out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wrk(url: str, connections: int, seconds: int) -> float:
    run = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    )
    print(run.stdout)
    found = re.search(r"Requests/sec:\s+([\d.]+)", run.stdout)
    assert found, run.stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", run.stdout)
    assert errors is None, run.stdout
    return float(found.group(1))


async def _httpx_rate(url: str, connections: int, seconds: float) -> float:
    done = 0
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=connections)) as client:

        async def one() -> None:
            nonlocal done
            while time.monotonic() < stop:
                (await client.get(url)).raise_for_status()
                done += 1

        async with asyncio.TaskGroup() as tg:
            for _ in range(connections):
                tg.create_task(one())
    return done / seconds


@pytest.mark.skipif(not os.environ.get("BUSREG_PROXY_BENCH"), reason="BUSREG_PROXY_BENCH=1")
async def test_measure_proxy_overhead(busreg_namespace: Settings, worker: Any) -> None:
    settings = busreg_namespace
    n = int(os.environ.get("BUSREG_PROXY_BENCH_N", "3000"))
    connections = int(os.environ.get("BUSREG_PROXY_BENCH_CONNECTIONS", "16"))
    async with instances(settings, "bench", "b-1") as (instance,):
        gw = await start_child(settings, "gateway", "bench")
        try:
            direct_url = f"http://{instance.address}/echo"
            proxied_url = f"http://{gw.address}/route/bench/echo"
            async with httpx.AsyncClient(timeout=10) as client:
                await eventually(
                    lambda: client.get(proxied_url),
                    lambda r: r.status_code == 200,
                    timeout=15,
                    what="the gateway routing to the instance",
                )
                direct = await _latencies(client, direct_url, n)
                proxied = await _latencies(client, proxied_url, n)
            rate: dict[str, float] = {}
            cpu: dict[str, float] = {}
            for name, url in (("direct", direct_url), ("proxied", proxied_url)):
                pid = (instance if name == "direct" else gw).proc.pid
                used = _cpu_seconds(pid)
                if shutil.which("wrk"):
                    rate[name] = await asyncio.to_thread(_wrk, url, connections, 10)
                else:
                    rate[name] = await _httpx_rate(url, connections, 10)
                cpu[name] = (_cpu_seconds(pid) - used) / 10  # cores busy in the server
        finally:
            await gw.stop()
    report = {
        "requests": n,
        "direct_ms": {"p50": _percentile(direct, 0.5), "p99": _percentile(direct, 0.99)},
        "proxied_ms": {"p50": _percentile(proxied, 0.5), "p99": _percentile(proxied, 0.99)},
        "overhead_ms": {
            "p50": _percentile(proxied, 0.5) - _percentile(direct, 0.5),
            "p99": _percentile(proxied, 0.99) - _percentile(direct, 0.99),
            "mean": statistics.fmean(proxied) - statistics.fmean(direct),
        },
        "requests_per_second": rate,
        "server_cpu_cores": cpu,
        "load_generator": f"wrk -t1 -c{connections} -d10s"
        if shutil.which("wrk")
        else f"httpx, {connections} connections",
    }
    print("\nPROXY BENCH " + json.dumps(report, indent=1))
