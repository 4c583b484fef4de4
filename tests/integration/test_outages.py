"""Broker restart and Redis data loss under load: exact state afterwards, nothing expired.

Uses private servers (tests/integration/private_servers.py) so the shared ones stay up.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from busreg import DeltaKind, Registry, Settings
from busreg.settings import ClientSettings, WorkerSettings
from busreg.testing import BusregServers, applied_namespace, running_worker

from .helpers import eventually, partition_states
from .private_servers import PrivateRabbit, PrivateRedis, private_rabbitmq, private_redis

pytestmark = pytest.mark.servers

INSTANCES = 100


@pytest.fixture(scope="module")
def rabbit() -> Iterator[PrivateRabbit]:
    with private_rabbitmq() as node:
        yield node


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    with private_redis() as server:
        yield server


def _settings(amqp: str, stream: str | None, redis: str) -> Settings:
    return Settings(
        amqp_url=amqp,
        stream_url=stream,
        redis_url=redis,
        namespace=f"o{uuid.uuid4().hex[:10]}",
        partitions=4,
        stream_max_bytes=16 * 1024 * 1024,
        stream_segment_bytes=1024 * 1024,
        worker=WorkerSettings(lease_ttl=1.5),
        client=ClientSettings(heartbeat_interval=0.5, ttl=2.0, request_timeout=5.0),
    )


@pytest_asyncio.fixture
async def applied(outage_settings: Settings) -> AsyncIterator[Settings]:
    """The outage settings with their topology applied on the private broker."""
    async with applied_namespace(outage_settings) as settings:
        yield settings


async def _register_all(client: Registry) -> list[object]:
    return [
        await client.register(
            f"svc-{n % 10}",
            address=f"127.0.0.1:{20000 + n}",
            instance_id=f"i-{n}",
            metadata={"n": str(n)},
        )
        for n in range(INSTANCES)
    ]


async def _views(watcher: Registry) -> dict[str, object]:
    return {f"svc-{s}": await watcher.watch(f"svc-{s}", resync_interval=None) for s in range(10)}


@pytest.fixture
def outage_settings(rabbit: PrivateRabbit, busreg_servers: BusregServers) -> Settings:
    return _settings(rabbit.amqp_url, rabbit.stream_url, busreg_servers.redis_url)


async def test_broker_restart_under_load_keeps_every_instance(
    rabbit: PrivateRabbit, applied: Settings
) -> None:
    settings = applied
    async with (
        running_worker(settings),
        Registry(settings) as registrants,
        Registry(settings) as watcher,
    ):
        regs = await _register_all(registrants)
        views = await _views(watcher)
        streams = {s: v.changes() for s, v in views.items()}  # type: ignore[attr-defined]
        for v in views.values():
            await v.wait_for(lambda i: len(i) == INSTANCES // 10, timeout=20)  # type: ignore[attr-defined]
        sent_before = [r.heartbeats_sent for r in regs]  # type: ignore[attr-defined]
        t0 = time.monotonic()
        await asyncio.to_thread(rabbit.stop_app)
        await asyncio.sleep(3)  # the outage: the broker is down for this long
        await asyncio.to_thread(rabbit.start_app)
        back = time.monotonic() - t0

        # every instance heartbeats again, and a new registration gets through end to end
        async def counts() -> list[int]:
            return [r.heartbeats_sent for r in regs]  # type: ignore[attr-defined]

        await eventually(
            counts,
            lambda now: all(n > b + 1 for n, b in zip(now, sent_before, strict=True)),
            timeout=30,
            what="every instance heartbeating again",
        )
        recovered = time.monotonic() - t0
        await registrants.register("svc-0", address="127.0.0.1:29999", instance_id="marker")
        await views["svc-0"].wait_for(lambda i: "marker" in i, timeout=20)  # type: ignore[attr-defined]
        removed = []
        for s, stream in streams.items():
            while not stream._queue.empty():
                change = await anext(stream)
                if change.kind is DeltaKind.REMOVED:
                    removed.append((s, change.instance_id))
        assert removed == [], f"falsely expired during the outage: {removed}"
        for s, v in views.items():
            snap = await watcher.snapshot(s)
            assert {i.instance_id for i in snap.instances} == set(v.instances)  # type: ignore[attr-defined]
            assert v.revision == snap.revision  # type: ignore[attr-defined]
            assert snap.revision == (11 if s == "svc-0" else 10)
        states = await partition_states(settings)
        assert sum(int(st.get("expired", 0)) for st in states.values()) == 0
    print(f"broker down {back:.1f}s; all {INSTANCES} heartbeating again after {recovered:.1f}s")


@pytest_asyncio.fixture
async def redis_settings(
    redis_server: PrivateRedis, busreg_servers: BusregServers
) -> AsyncIterator[Settings]:
    settings = _settings(busreg_servers.amqp_url, busreg_servers.stream_url, redis_server.url)
    try:
        async with applied_namespace(settings):
            yield settings
    finally:
        if redis_server.process is None:
            redis_server.start()  # so the namespace's keys can be cleaned up


async def test_redis_restarting_empty_heals_within_interval_plus_ttl(
    redis_server: PrivateRedis, redis_settings: Settings
) -> None:
    settings = redis_settings
    bound = settings.client.heartbeat_interval + settings.client.ttl
    async with (
        running_worker(settings),
        Registry(settings) as registrants,
        Registry(settings) as watcher,
    ):
        await _register_all(registrants)
        views = await _views(watcher)
        for v in views.values():
            await v.wait_for(lambda i: len(i) == INSTANCES // 10, timeout=20)  # type: ignore[attr-defined]
        epochs = {s: v.epoch for s, v in views.items()}  # type: ignore[attr-defined]
        expected = {s: dict(v.instances) for s, v in views.items()}  # type: ignore[attr-defined]
        redis_server.kill()
        t0 = time.monotonic()
        redis_server.start()  # empty: no persistence
        healed = None
        async with asyncio.timeout(30):
            while True:
                try:
                    snaps = [await watcher.snapshot(s) for s in views]
                except Exception:  # workers may answer "unavailable" while Redis is back
                    snaps = []
                if snaps and all(
                    {i.instance_id: i for i in snap.instances} == expected[snap.service]
                    for snap in snaps
                ):
                    healed = time.monotonic() - t0
                    break
                await asyncio.sleep(0.05)  # the registry heals itself; we observe it
        for s, v in views.items():
            # the view keeps its instances through the rebuild and moves to the new epoch
            # when the caught-up state is announced
            await v.wait_for(  # type: ignore[attr-defined]
                lambda i, s=s, v=v: i == expected[s] and v.epoch != epochs[s], timeout=20
            )
            assert v.epoch != epochs[s], "the rebuilt state must carry a new epoch"  # type: ignore[attr-defined]
    print(f"Redis lost everything; registry healed after {healed:.2f}s (bound {bound}s)")
    assert healed is not None
    assert healed <= bound + 2.0  # bound + slack for a loaded CI machine; the figure is printed
