"""pytest plugin (entry point ``pytest11``): real RabbitMQ and Redis for busreg tests.

Install ``busreg[testing]``; then in any test::

    async def test_sees_instance(busreg_worker, busreg_registry):
        await busreg_registry.register("inventory", address="127.0.0.1:8080")
        view = await busreg_registry.watch("inventory")
        await view.wait_for(lambda i: len(i) == 1, timeout=5)

Where the servers come from, per server:

1. ``BUSREG_TEST_AMQP_URL`` / ``BUSREG_TEST_REDIS_URL`` (and optionally
   ``BUSREG_TEST_STREAM_URL``) when set: servers you run (the stream plugin must be on);
2. otherwise, if Docker answers, testcontainers start ``rabbitmq:3.10-management`` (with
   ``rabbitmq_stream`` enabled and its advertised port mapped) and ``redis:7.0``;
3. otherwise the tests are skipped with a message saying what to set, except under
   ``CI=true``, where a missing server is a failure.

Every test gets its own namespace (a unique prefix for streams, exchanges, queues and Redis
keys), which is deleted afterwards, so tests can share long-lived servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from busreg.client.registry import Registry
from busreg.ops.admin import applied_namespace, delete_namespace
from busreg.server.worker import Worker
from busreg.settings import ClientSettings, Settings, WorkerSettings

__all__ = [
    "BusregServers",
    "applied_namespace",
    "busreg_namespace",
    "busreg_registry",
    "busreg_servers",
    "busreg_settings",
    "busreg_worker",
    "cleanup_namespace",
    "running_worker",
]

RABBITMQ_IMAGE = "rabbitmq:3.10-management"
REDIS_IMAGE = "redis:7.0"


@dataclass(frozen=True)
class BusregServers:
    amqp_url: str
    redis_url: str
    stream_url: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "busreg(partitions=N): partitions of the test's namespace (default 4)"
    )


def _missing(what: str) -> None:
    message = (
        f"busreg tests need {what}: set BUSREG_TEST_AMQP_URL and BUSREG_TEST_REDIS_URL "
        "(e.g. amqp://guest:guest@127.0.0.1:5672/ with rabbitmq_stream enabled, "
        "redis://127.0.0.1:6379/15), or make Docker available for testcontainers"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:  # any failure means: no usable Docker here
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def _containers() -> Iterator[BusregServers]:
    from testcontainers.rabbitmq import RabbitMqContainer
    from testcontainers.redis import RedisContainer

    # The stream protocol tells clients where to connect (advertised host/port), so the
    # host port must be known before the broker starts: bind a chosen free port.
    stream_port = _free_port()
    rabbit = (
        RabbitMqContainer(RABBITMQ_IMAGE)
        .with_bind_ports(5552, stream_port)
        .with_env(
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
            "-rabbitmq_stream advertised_host localhost "
            f"-rabbitmq_stream advertised_port {stream_port}",
        )
        .with_command(
            "sh -c 'rabbitmq-plugins enable --offline rabbitmq_stream && rabbitmq-server'"
        )
    )
    redis = RedisContainer(REDIS_IMAGE)
    with rabbit, redis:
        amqp_port = rabbit.get_exposed_port(5672)
        host = rabbit.get_container_host_ip()
        yield BusregServers(
            amqp_url=f"amqp://guest:guest@{host}:{amqp_port}/",
            redis_url=f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0",
            stream_url=f"rabbitmq-stream://guest:guest@{host}:{stream_port}/",
        )


@pytest.fixture(scope="session")
def busreg_servers() -> Iterator[BusregServers]:
    """URLs of a RabbitMQ (with streams) and a Redis, from the environment or containers."""
    amqp = os.environ.get("BUSREG_TEST_AMQP_URL")
    redis = os.environ.get("BUSREG_TEST_REDIS_URL")
    if amqp and redis:
        yield BusregServers(amqp, redis, os.environ.get("BUSREG_TEST_STREAM_URL"))
        return
    if not _docker_answers():
        _missing("RabbitMQ and Redis")
    with _containers() as servers:
        yield servers


@pytest.fixture
def busreg_settings(busreg_servers: BusregServers, request: pytest.FixtureRequest) -> Settings:
    """Settings for a fresh, unique namespace with test-friendly (fast) timings."""
    marker = request.node.get_closest_marker("busreg")
    partitions = int(marker.kwargs.get("partitions", 4)) if marker else 4
    return Settings(
        amqp_url=busreg_servers.amqp_url,
        redis_url=busreg_servers.redis_url,
        stream_url=busreg_servers.stream_url,
        namespace=f"t{uuid.uuid4().hex[:10]}",
        partitions=partitions,
        stream_max_bytes=16 * 1024 * 1024,
        stream_segment_bytes=1024 * 1024,
        worker=WorkerSettings(lease_ttl=1.5, drain_timeout=5.0),
        client=ClientSettings(heartbeat_interval=0.5, ttl=2.0, request_timeout=5.0),
    )


async def cleanup_namespace(settings: Settings) -> None:
    """Delete everything a namespace created: streams, queues, exchanges, Redis keys."""
    await delete_namespace(settings)


@pytest_asyncio.fixture
async def busreg_namespace(busreg_settings: Settings) -> AsyncIterator[Settings]:
    """``busreg_settings`` with the topology applied; everything is removed afterwards."""
    async with applied_namespace(busreg_settings) as settings:
        yield settings


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, *, worker_id: str | None = None, wait_owned: int | None = None
) -> AsyncIterator[Worker]:
    """Run an in-process worker; wait until it owns ``wait_owned`` partitions (default all)."""
    want = settings.partitions if wait_owned is None else wait_owned
    async with Worker(settings, worker_id=worker_id) as worker, asyncio.TaskGroup() as tg:
        tg.create_task(worker.run(), name=f"worker-{worker.worker_id}")
        try:
            async with asyncio.timeout(15):
                await worker.wait_owned(lambda owned: len(owned) >= want)
            yield worker
        finally:
            worker.stop()


@pytest_asyncio.fixture
async def busreg_worker(busreg_namespace: Settings) -> AsyncIterator[Worker]:
    """An in-process shard worker owning every partition of the test namespace."""
    async with running_worker(busreg_namespace) as worker:
        yield worker


@pytest_asyncio.fixture
async def busreg_registry(busreg_namespace: Settings) -> AsyncIterator[Registry]:
    """A registry client of the test namespace (instances it registered are deregistered)."""
    async with Registry(busreg_namespace, name="busreg-test-client") as registry:
        yield registry
