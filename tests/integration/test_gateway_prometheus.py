"""Real discovery clients find busreg instances through the gateway, with no plugin (issue
13 §4, issue 14):

* a real Prometheus (Debian's package, run as a process of this test) with
  ``http_sd_configs`` against ``/prometheus/sd`` and ``eureka_sd_configs`` against the
  gateway's Eureka API; its ``/api/v1/targets`` shows what it discovered, with the labels
  our docs promise, and follows an instance added and one removed. (Debian builds
  Prometheus without ``consul_sd_configs``, hence the next point.)
* a real Consul client (``py-consul``, the library many tools build on) reads the Consul
  API subset: the catalog, health with ``passing``, and a blocking query that returns
  within a second of a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from busreg import Registry, Settings, Worker

from .helpers import eventually, free_port, gateway_process, spawn_logged, stop_process, until_ok

pytestmark = pytest.mark.servers

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def _need_prometheus() -> None:
    if not os.access(PROMETHEUS, os.X_OK):
        message = "Debian's prometheus is not installed (apt-get install prometheus)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@contextlib.asynccontextmanager
async def prometheus(gateway_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """A Prometheus discovering from ``gateway_url``; yields its HTTP API base URL."""
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"""
global:
  scrape_interval: 1h   # discovery is what is under test, not scraping
scrape_configs:
  - job_name: busreg-http-sd
    http_sd_configs:
      - url: {gateway_url}/prometheus/sd
        refresh_interval: 1s
  - job_name: busreg-eureka
    eureka_sd_configs:
      - server: {gateway_url}/eureka
        refresh_interval: 1s
"""
    )
    port = free_port()
    log = tmp_path / "prometheus.log"
    proc = await asyncio.to_thread(
        spawn_logged,
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        dict(os.environ),
        log,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await until_ok(proc, f"{base}/-/ready", log, "prometheus")
        yield base
    finally:
        await asyncio.to_thread(stop_process, proc)


async def _targets(http: httpx.AsyncClient, base: str) -> dict[str, list[dict[str, Any]]]:
    """Discovered labels of the active targets, by job."""
    reply = (await http.get(f"{base}/api/v1/targets", params={"state": "active"})).json()
    found: dict[str, list[dict[str, Any]]] = {}
    for target in reply["data"]["activeTargets"]:
        found.setdefault(target["scrapePool"], []).append(target["discoveredLabels"])
    return found


def _addresses(found: dict[str, list[dict[str, Any]]], job: str) -> set[str]:
    return {t["__address__"] for t in found.get(job, [])}


async def test_prometheus_discovers_instances_through_http_sd_and_eureka(
    busreg_worker: Worker, busreg_registry: Registry, busreg_namespace: Settings, tmp_path: Path
) -> None:
    _need_prometheus()
    registry = busreg_registry
    # closed ports on the loopback: Prometheus only discovers them here
    await registry.register(
        "inventory",
        address="127.0.0.1:1",
        instance_id="inv-1",
        zone="eu-1a",
        metadata={"metrics_path": "/custom/metrics", "team": "stock"},
    )
    await registry.register("inventory", address="127.0.0.1:2", instance_id="inv-2", zone="eu-1b")
    await registry.register("cart", address="127.0.0.1:3", instance_id="cart-1")
    first = {"127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"}
    async with (
        gateway_process(busreg_namespace, tmp_path / "gw.log") as gw,
        prometheus(gw.url, tmp_path) as prom,
        httpx.AsyncClient(timeout=5.0) as http,
    ):
        found = await eventually(
            lambda: _targets(http, prom),
            lambda f: (
                _addresses(f, "busreg-http-sd") == first and _addresses(f, "busreg-eureka") == first
            ),
            timeout=30,
            what="both jobs discover the three instances",
        )
        http_sd = {t["__meta_busreg_instance_id"]: t for t in found["busreg-http-sd"]}
        inv1 = http_sd["inv-1"]
        assert inv1["__meta_busreg_service"] == "inventory"
        assert inv1["__meta_busreg_zone"] == "eu-1a"
        assert inv1["__meta_busreg_status"] == "UP"
        assert inv1["__meta_busreg_metadata_metrics_path"] == "/custom/metrics"
        assert inv1["__meta_busreg_metadata_team"] == "stock"
        eureka = {t["__meta_eureka_app_instance_id"]: t for t in found["busreg-eureka"]}
        assert {t["__meta_eureka_app_name"] for t in eureka.values()} == {"INVENTORY", "CART"}
        assert eureka["inv-1"]["__meta_eureka_app_instance_status"] == "UP"
        assert eureka["inv-1"]["__meta_eureka_app_instance_metadata_team"] == "stock"

        # a change reaches Prometheus: one more instance, one fewer
        reg = await registry.register(
            "inventory", address="127.0.0.1:4", instance_id="inv-3", zone="eu-1a"
        )
        await eventually(
            lambda: _targets(http, prom),
            lambda f: (
                "127.0.0.1:4" in _addresses(f, "busreg-eureka")
                and "127.0.0.1:4" in _addresses(f, "busreg-http-sd")
            ),
            timeout=30,
            what="the new instance discovered",
        )
        await reg.deregister()
        await eventually(
            lambda: _targets(http, prom),
            lambda f: (
                "127.0.0.1:4" not in _addresses(f, "busreg-eureka")
                and "127.0.0.1:4" not in _addresses(f, "busreg-http-sd")
            ),
            timeout=30,
            what="the deregistered instance gone",
        )


async def test_a_consul_client_reads_the_catalog_and_blocks_until_a_change(
    busreg_worker: Worker, busreg_registry: Registry, busreg_namespace: Settings, tmp_path: Path
) -> None:
    import consul

    registry = busreg_registry
    await registry.register(
        "inventory", address="127.0.0.1:1", instance_id="inv-1", metadata={"team": "stock"}
    )
    async with gateway_process(busreg_namespace, tmp_path / "gw.log") as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        client = consul.Consul(host=host, port=int(port))
        _, services = await asyncio.to_thread(client.catalog.services)
        assert "inventory" in services
        index, nodes = await asyncio.to_thread(client.health.service, "inventory", passing=True)
        assert [(n["Service"]["ID"], n["Service"]["Port"]) for n in nodes] == [("inv-1", 1)]
        assert nodes[0]["Service"]["Meta"]["team"] == "stock"

        # a blocking query: held while nothing changes, answered within 1 s of a change
        loop = asyncio.get_running_loop()
        blocked = asyncio.create_task(
            asyncio.to_thread(client.health.service, "inventory", index=index, wait="20s")
        )
        await asyncio.sleep(0.5)  # the query is held: nothing changed yet (checked below)
        assert not blocked.done()
        changed_at = loop.time()
        await registry.register("inventory", address="127.0.0.1:2", instance_id="inv-2")
        new_index, nodes = await asyncio.wait_for(blocked, 15)
        answered = loop.time() - changed_at
        assert int(new_index) > int(index)
        assert {n["Service"]["ID"] for n in nodes} == {"inv-1", "inv-2"}
        # the register call's own confirm is in this figure too
        assert answered < 1.5, f"blocking query answered {answered:.2f}s after the change"
