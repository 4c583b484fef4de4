"""busreg.testing's container branch, as a user's project meets it: no BUSREG_TEST_* URLs,
Docker answering. The fixtures start RabbitMQ (stream plugin, advertised port mapped) and
Redis once per session; these tests use them the way README's example does."""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlsplit

import pytest

from busreg import Registry
from busreg.server.worker import Worker
from busreg.settings import Settings
from busreg.testing import BusregServers, running_worker

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("BUSREG_TEST_AMQP_URL") or os.environ.get("BUSREG_TEST_REDIS_URL")),
    reason="the container branch runs only without BUSREG_TEST_* URLs",
)


def test_servers_are_containers(busreg_servers: BusregServers) -> None:
    # published ports, not the local servers' 5672/5552/6379
    assert busreg_servers.stream_url is not None
    ports = {urlsplit(u).port for u in (busreg_servers.amqp_url, busreg_servers.redis_url)}
    assert ports.isdisjoint({5672, 6379})
    assert urlsplit(busreg_servers.stream_url).port != 5552


async def test_instance_is_seen(busreg_worker: Worker, busreg_registry: Registry) -> None:
    view = await busreg_registry.watch("inventory")
    await busreg_registry.register("inventory", address="127.0.0.1:8080", instance_id="inv-1")
    await view.wait_for(lambda instances: "inv-1" in instances, timeout=10)


@pytest.mark.busreg(partitions=2)
async def test_second_worker_takes_over(
    busreg_namespace: Settings, busreg_registry: Registry
) -> None:
    async with running_worker(busreg_namespace, worker_id="first") as first:
        view = await busreg_registry.watch("orders")
        await busreg_registry.register("orders", address="10.0.0.1:80", instance_id="o-1")
        await view.wait_for(lambda instances: "o-1" in instances, timeout=10)
        async with running_worker(busreg_namespace, worker_id="second", wait_owned=0) as second:
            first.stop()
            async with asyncio.timeout(20):
                await second.wait_owned(lambda owned: len(owned) == 2)
            await busreg_registry.register("orders", address="10.0.0.2:80", instance_id="o-2")
            await view.wait_for(lambda instances: {"o-1", "o-2"} <= set(instances), timeout=10)
