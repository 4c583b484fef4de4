"""Prometheus discovery through a real ``busreg gateway`` process: the ``http_sd_config``
format, and the Consul subset ``consul_sd_config`` reads, with blocking-query semantics.

What Prometheus expects (its discovery/http and discovery/consul code): http_sd answers
200 with ``Content-Type: application/json`` and a list of target groups; Consul answers
carry ``X-Consul-Index`` (>= 1, moving exactly when the answer changes, never backwards),
and a query with ``?index=`` blocks until the answer changes or ``wait`` passes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from busreg import InstanceStatus, Registry, Settings
from busreg.server.worker import Worker

from .helpers import GatewayProcess, eventually, gateway_process

pytestmark = pytest.mark.servers


@pytest.fixture
async def gateway(
    busreg_worker: Worker, busreg_namespace: Settings, tmp_path: Path
) -> AsyncIterator[GatewayProcess]:
    async with gateway_process(busreg_namespace, tmp_path / "gateway.log") as gw:
        yield gw


async def _health(http: httpx.AsyncClient, service: str, **params: str) -> httpx.Response:
    response = await http.get(f"/v1/health/service/{service}", params=params)
    assert response.status_code == 200, response.text
    return response


async def _count(http: httpx.AsyncClient, service: str, n: int) -> int:
    """Wait until the gateway shows ``n`` instances of ``service``; its X-Consul-Index."""

    async def probe() -> httpx.Response:
        return await _health(http, service)

    response = await eventually(
        probe, lambda r: len(r.json()) == n, timeout=10, what=f"{n} instances of {service}"
    )
    return int(response.headers["x-consul-index"])


async def test_http_sd_format(gateway: GatewayProcess, busreg_registry: Registry) -> None:
    a = await busreg_registry.register(
        "api", address="127.0.0.1:9501", zone="eu-1a", metadata={"git.sha": "abc", "team": "x"}
    )
    b = await busreg_registry.register("api", address="127.0.0.1:9502", zone="eu-1b")
    c = await busreg_registry.register("billing", address="127.0.0.1:9601", status="STARTING")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as http:

        async def sd() -> httpx.Response:
            return await http.get("/prometheus/sd")

        response = await eventually(sd, lambda r: len(r.json()) == 3, timeout=10, what="3")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        groups = response.json()
        assert [g["targets"] for g in groups] == [
            [r.address] for r in sorted((a, b), key=lambda r: r.instance_id)
        ] + [[c.address]]
        by_id = {g["labels"]["__meta_busreg_instance_id"]: g["labels"] for g in groups}
        assert by_id[a.instance_id] == {
            "__meta_busreg_service": "api",
            "__meta_busreg_instance_id": a.instance_id,
            "__meta_busreg_zone": "eu-1a",
            "__meta_busreg_status": "UP",
            "__meta_busreg_address": "127.0.0.1:9501",
            "__meta_busreg_incarnation": str(a.incarnation),
            "__meta_busreg_metadata_git_sha": "abc",
            "__meta_busreg_metadata_team": "x",
        }
        assert by_id[c.instance_id]["__meta_busreg_status"] == "STARTING"
        for labels in by_id.values():
            assert all(isinstance(v, str) for v in labels.values())
        # the same answer while nothing changes (stable order)
        assert (await http.get("/prometheus/sd")).content == response.content
        one = (await http.get("/prometheus/sd", params={"service": "billing"})).json()
        assert [g["targets"] for g in one] == [[c.address]]
        assert (await http.get("/prometheus/sd", params={"service": "nosuch"})).json() == []


async def test_consul_agent_and_catalog(
    gateway: GatewayProcess, busreg_registry: Registry, busreg_namespace: Settings
) -> None:
    reg = await busreg_registry.register(
        "orders", address="127.0.0.1:9701", zone="eu-1a", metadata={"tags": "blue,v2"}
    )
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as http:
        me = (await http.get("/v1/agent/self")).json()
        assert me["Config"]["Datacenter"] == busreg_namespace.namespace
        await _count(http, "orders", 1)
        services = await http.get("/v1/catalog/services")
        assert services.json()["orders"] == ["blue", "v2", "zone=eu-1a"]
        assert int(services.headers["x-consul-index"]) >= 1
        assert services.headers["x-consul-knownleader"] == "true"
        assert services.headers["x-consul-lastcontact"] == "0"
        (row,) = (await http.get("/v1/catalog/service/orders")).json()
        assert row["ServiceID"] == reg.instance_id
        assert (row["ServiceAddress"], row["ServicePort"]) == ("127.0.0.1", 9701)
        assert row["ServiceTags"] == ["zone=eu-1a", "blue", "v2"]
        assert row["ServiceMeta"] == {"tags": "blue,v2"}
        assert row["Datacenter"] == busreg_namespace.namespace
        (entry,) = (await _health(http, "orders")).json()
        assert entry["Service"]["Address"] == "127.0.0.1"
        assert entry["Service"]["Port"] == 9701
        assert entry["Node"]["Address"] == "127.0.0.1"
        assert [c["Status"] for c in entry["Checks"]] == ["passing"]
        assert len((await _health(http, "orders", tag="zone=eu-1a")).json()) == 1
        assert (await _health(http, "orders", tag="zone=us-1")).json() == []
        assert (await _health(http, "nosuch")).json() == []


async def test_consul_blocking_query_returns_within_a_second_of_a_change(
    gateway: GatewayProcess, busreg_registry: Registry
) -> None:
    first = await busreg_registry.register("pay", address="127.0.0.1:9801")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        index = await _count(http, "pay", 1)
        blocked = asyncio.create_task(_health(http, "pay", index=str(index), wait="20s"))
        second = await busreg_registry.register("pay", address="127.0.0.1:9802")
        changed_at = time.monotonic()  # the broker confirmed the registration
        response = await asyncio.wait_for(blocked, timeout=5)
        took = time.monotonic() - changed_at
        assert took < 1.0, f"the blocked query returned {took:.2f}s after the change"
        new_index = int(response.headers["x-consul-index"])
        assert new_index > index
        assert {e["Service"]["ID"] for e in response.json()} == {
            first.instance_id,
            second.instance_id,
        }
        # a deregistration releases the next blocked query too, with a larger index
        blocked = asyncio.create_task(_health(http, "pay", index=str(new_index), wait="20s"))
        await second.deregister()
        response = await asyncio.wait_for(blocked, timeout=5)
        assert int(response.headers["x-consul-index"]) > new_index
        assert [e["Service"]["ID"] for e in response.json()] == [first.instance_id]


async def test_consul_unchanged_query_holds_until_wait(
    gateway: GatewayProcess, busreg_registry: Registry
) -> None:
    await busreg_registry.register("ledger", address="127.0.0.1:9901")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        index = await _count(http, "ledger", 1)
        began = time.monotonic()
        blocked = asyncio.create_task(_health(http, "ledger", index=str(index), wait="2s"))
        # a change of *another* service moves the gateway but not this answer: still held
        await busreg_registry.register("other", address="127.0.0.1:9902")
        await _count(http, "other", 1)
        response = await blocked
        held = time.monotonic() - began
        assert 1.9 <= held < 4.0, f"held {held:.2f}s for wait=2s"
        assert int(response.headers["x-consul-index"]) == index, "index moved with no change"
        # without ?index (or index=0) the answer is immediate
        began = time.monotonic()
        await _health(http, "ledger", wait="2s")
        assert time.monotonic() - began < 1.0
        # an index from elsewhere (e.g. before a gateway restart) answers at once, so a
        # Consul client sees the index go back and starts over
        began = time.monotonic()
        response = await _health(http, "ledger", index=str(index + 10_000), wait="2s")
        assert time.monotonic() - began < 1.0
        assert int(response.headers["x-consul-index"]) == index


async def test_consul_index_moves_only_forward_and_only_on_changes(
    gateway: GatewayProcess, busreg_registry: Registry
) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        indexes = []
        regs = []
        for n in range(3):
            regs.append(await busreg_registry.register("grow", address=f"127.0.0.1:{9910 + n}"))
            indexes.append(await _count(http, "grow", n + 1))
            # asked again with nothing changed: the same index
            again = await _health(http, "grow")
            assert int(again.headers["x-consul-index"]) == indexes[-1]
        await regs[0].deregister()
        indexes.append(await _count(http, "grow", 2))
        assert indexes == sorted(set(indexes)), f"not strictly increasing: {indexes}"
        assert min(indexes) >= 1


# --- measurement (docs/gateway.md, "Measured") ---------------------------------------------------


async def measure(instances: int = 1000, services: int = 50, dashboards: int = 20) -> None:
    """Gateway RSS and CPU with ``instances`` over ``services`` and ``dashboards`` open
    event streams, idle (heartbeats only) and under churn (status flips, 50 changes/s).

    ``python -m tests.integration.test_gateway_discovery`` with BUSREG_AMQP_URL and
    BUSREG_REDIS_URL pointing at real servers; a fresh namespace is created and deleted."""
    import os
    import tempfile
    import uuid

    from busreg.ops.admin import applied_namespace

    from .helpers import spawn_worker, stop_process

    def usage(pid: int) -> tuple[float, float]:
        """(RSS MiB, CPU seconds user+system) of ``pid``."""
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return rss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def cpu_over(pid: int, seconds: float) -> float:
        _, before = usage(pid)
        await asyncio.sleep(seconds)  # the measurement window
        _, after = usage(pid)
        return 100 * (after - before) / seconds

    settings = Settings(namespace=f"gwm{uuid.uuid4().hex[:8]}")
    tmp = Path(tempfile.mkdtemp(prefix="busreg-gw-measure-"))
    async with applied_namespace(settings):
        worker = spawn_worker(settings, "m1", tmp / "worker.log")
        try:
            async with (
                Registry(settings, name="gw-measure") as registry,
                gateway_process(settings, tmp / "gateway.log") as gw,
                httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
            ):
                regs = []
                for n in range(instances):
                    regs.append(
                        await registry.register(
                            f"svc{n % services:02d}",
                            address=f"10.{n // 250}.{n % 250}.1:8080",
                            zone=f"z{n % 3}",
                            metadata={"version": "1", "team": f"t{n % 7}"},
                        )
                    )

                async def total() -> int:
                    body = (await http.get("/api/v1/services")).json()
                    return sum(s["instances"] for s in body["services"])

                await eventually(total, lambda t: t == instances, timeout=120, what="all")
                pid = gw.proc.pid
                rss0, _ = usage(pid)
                began = time.monotonic()
                sd = await http.get("/prometheus/sd")
                sd_ms = (time.monotonic() - began) * 1000
                received = [0] * dashboards

                async def dashboard(k: int) -> None:
                    async with http.stream("GET", "/api/v1/events", timeout=None) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("event: change"):
                                received[k] += 1

                async with asyncio.TaskGroup() as tg:
                    readers = [tg.create_task(dashboard(k)) for k in range(dashboards)]
                    idle_cpu = await cpu_over(pid, 20)
                    rss_idle, _ = usage(pid)

                    async def churn(rate: float) -> None:
                        # updates at a fixed pace, each in its own task (a confirm must
                        # not slow the pace down)
                        flips = 0
                        async with asyncio.TaskGroup() as updates:
                            while True:
                                reg = regs[flips % len(regs)]
                                down = flips // len(regs) % 2 == 0
                                status = InstanceStatus.DOWN if down else InstanceStatus.UP
                                updates.create_task(reg.update(status=status))
                                flips += 1
                                await asyncio.sleep(1 / rate)  # the churn pace

                    seen = received[0]
                    flipper = tg.create_task(churn(50.0))
                    churn_cpu = await cpu_over(pid, 20)
                    rate = (received[0] - seen) / 20
                    rss_churn, _ = usage(pid)
                    flipper.cancel()
                    for reader in readers:
                        reader.cancel()
                print(
                    f"instances={instances} services={services} dashboards={dashboards}\n"
                    f"RSS after load {rss0:.1f} MiB; with dashboards idle {rss_idle:.1f} MiB; "
                    f"after churn {rss_churn:.1f} MiB\n"
                    f"CPU idle (heartbeats only) {idle_cpu:.1f}%; churn {rate:.0f} changes/s "
                    f"to each of {dashboards} dashboards: {churn_cpu:.1f}% of one core\n"
                    f"/prometheus/sd: {len(sd.content)} bytes in {sd_ms:.0f} ms; changes "
                    f"received per dashboard: min {min(received)} max {max(received)}"
                )
        finally:
            stop_process(worker)


if __name__ == "__main__":
    asyncio.run(measure())
