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
   ``rabbitmq_stream`` enabled and its advertised host/port the published ones) and
   ``redis:7.0``, or the images named by ``BUSREG_TEST_RABBITMQ_IMAGE`` /
   ``BUSREG_TEST_REDIS_IMAGE``. The usual mistakes (Ryuk on where no registry answers, an
   address testcontainers cannot reach, a broker refusing guest from the host, a missing
   image) fail the session at once with a message saying what to set;
3. otherwise the tests are skipped with a message saying what to set, except under
   ``CI=true``, where a missing server is a failure.

Every test gets its own namespace (a unique prefix for streams, exchanges, queues and Redis
keys), which is deleted afterwards, so tests can share long-lived servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
import pytest_asyncio

from busreg.client.registry import Registry
from busreg.ops.admin import applied_namespace, delete_namespace
from busreg.server.worker import Worker
from busreg.settings import ClientSettings, Settings, WorkerSettings

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

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

#: images the container branch starts unless BUSREG_TEST_RABBITMQ_IMAGE / _REDIS_IMAGE name
#: others (a RabbitMQ >= 3.10 image that lets guest log in from the host, like the official
#: one, and a Redis >= 7.0 image)
RABBITMQ_IMAGE = "rabbitmq:3.10-management"
REDIS_IMAGE = "redis:7.0"

_log = logging.getLogger("busreg.testing")


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


class _ContainerSetupError(Exception):
    """A container branch failure with a message that says what to change."""


#: what a restricted CI (no registry, tests on the Docker host) sets; README, "Testing"
_CI_HINT = (
    "Where no registry is reachable set TESTCONTAINERS_RYUK_DISABLED=true; where the tests "
    "run on the Docker host but /.dockerenv exists (or Docker is remote), set "
    "TESTCONTAINERS_CONNECTION_MODE=docker_host and TC_HOST=<address of the published ports, "
    "127.0.0.1 for a local engine>"
)


def _start(stack: contextlib.ExitStack, container: DockerContainer, setting: str) -> None:
    """Start a container, removed when ``stack`` closes; fail at once, with a message, where
    testcontainers would pull an image no registry serves."""
    import docker.errors
    from testcontainers.core.config import testcontainers_config as tc

    stack.callback(container.stop)  # a no-op if it was never created
    started = time.monotonic()
    try:
        container.start()
    except docker.errors.DockerException as exc:
        if not tc.ryuk_disabled and "ryuk" in str(exc).lower():
            raise _ContainerSetupError(
                f"testcontainers could not start its Ryuk container ({tc.ryuk_image}): {exc}. "
                + _CI_HINT
            ) from exc
        raise _ContainerSetupError(
            f"cannot start image {container.image!r}: {exc}. Pull or build it, or set "
            f"{setting} to an image this Docker has (docker images)"
        ) from exc
    _log.info("container %s started in %.2f s", container.image, time.monotonic() - started)


def _exited(container: DockerContainer) -> str | None:
    """The last log lines if the container is no longer running, else None."""
    wrapped = container.get_wrapped_container()
    wrapped.reload()
    if wrapped.status in ("created", "running"):
        return None
    logs: bytes = wrapped.logs(tail=20)
    return f"{container.image} exited ({wrapped.status}); its last lines:\n" + logs.decode(
        errors="replace"
    )


def _wait_redis(container: DockerContainer, host: str, port: int, deadline: float) -> None:
    """Until Redis answers PING at host:port. Published ports accept connections as soon
    as the container runs, so one that refuses them for 5 s means a wrong address."""
    unreachable_until = time.monotonic() + 5
    error: Exception | None = None
    while time.monotonic() < min(deadline, unreachable_until if error else deadline):
        try:
            with socket.create_connection((host, port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
                error = None  # reached: Redis still starting
        except OSError as exc:
            error = exc
        if (gone := _exited(container)) is not None:
            raise _ContainerSetupError(gone)
        time.sleep(0.1)
    from testcontainers.core.config import testcontainers_config as tc

    mode = container.get_docker_client().get_connection_mode().value
    dockerenv = "exists" if os.path.exists("/.dockerenv") else "absent"
    raise _ContainerSetupError(
        f"Redis of {container.image} did not answer at {host}:{port} ({error or 'no PONG'}); "
        f"testcontainers chose that address (connection mode {mode}, TC_HOST="
        f"{tc.tc_host_override!r}, /.dockerenv {dockerenv}). " + _CI_HINT
    )


async def _wait_rabbitmq(
    container: DockerContainer, servers: BusregServers, deadline: float
) -> None:
    """Until RabbitMQ takes an AMQP login and a stream client can publish through the
    advertised address; a refused login fails at once (it never gets better)."""
    import aio_pika
    import aiormq
    import rstream

    while True:
        try:
            connection = await aio_pika.connect(servers.amqp_url, timeout=3)
            await connection.close()
            break
        except aiormq.exceptions.ProbableAuthenticationError as exc:
            raise _ContainerSetupError(
                f"{container.image} refused guest's login from the host ({exc}): RabbitMQ lets "
                "guest in from localhost only unless its configuration says "
                "`loopback_users.guest = false`, as the official image's conf.d/10-defaults.conf "
                "does. busreg.testing replaces the image's command, so that setting must be in "
                "the image's files, not made by its entrypoint"
            ) from exc
        except (TimeoutError, OSError, aiormq.exceptions.AMQPConnectionError) as exc:
            if (gone := _exited(container)) is not None:
                raise _ContainerSetupError(gone) from exc
            if time.monotonic() > deadline:
                raise _ContainerSetupError(
                    f"RabbitMQ of {container.image} did not accept AMQP at {servers.amqp_url} "
                    f"in time ({exc!r})"
                ) from exc
        await asyncio.sleep(0.2)
    assert servers.stream_url is not None
    stream = urlsplit(servers.stream_url)
    probe = f"busreg-testing-probe-{uuid.uuid4().hex[:8]}"
    producer = rstream.Producer(
        stream.hostname or "127.0.0.1",
        stream.port or 5552,
        username="guest",
        password="guest",
        connection_name="busreg-testing-probe",
    )
    try:
        async with asyncio.timeout(max(5.0, deadline - time.monotonic())):
            while True:
                try:
                    await producer.start()
                    break
                except (TimeoutError, OSError) as exc:
                    if (gone := _exited(container)) is not None:
                        raise _ContainerSetupError(gone) from exc
                    await asyncio.sleep(0.2)
            await producer.create_stream(probe, exists_ok=True)
            # publishing asks the broker for the stream's leader and connects to the
            # address it advertises: the check that the mapping is right
            await producer.send_wait(probe, b"probe")
            await producer.delete_stream(probe, missing_ok=True)
    except TimeoutError as exc:
        raise _ContainerSetupError(
            f"the stream protocol of {container.image} did not work at {stream.netloc} in time: "
            "is rabbitmq_stream enabled and its advertised host/port the published ones?"
        ) from exc
    finally:
        await producer.close()


@contextlib.contextmanager
def _containers() -> Iterator[BusregServers]:
    from testcontainers.core.config import ConnectionMode
    from testcontainers.core.container import DockerContainer

    rabbit_image = os.environ.get("BUSREG_TEST_RABBITMQ_IMAGE") or RABBITMQ_IMAGE
    redis_image = os.environ.get("BUSREG_TEST_REDIS_IMAGE") or REDIS_IMAGE
    deadline = time.monotonic() + float(os.environ.get("BUSREG_TEST_CONTAINER_TIMEOUT") or 120)
    with contextlib.ExitStack() as stack:
        # Redis first: it starts in a fraction of a second and proves the address
        # testcontainers connects to before RabbitMQ is told to advertise it.
        redis = DockerContainer(redis_image).with_exposed_ports(6379)
        _start(stack, redis, "BUSREG_TEST_REDIS_IMAGE")
        mode = redis.get_docker_client().get_connection_mode()
        if mode is ConnectionMode.bridge_ip:
            raise _ContainerSetupError(
                "testcontainers chose connection mode bridge_ip (container addresses, no "
                "published ports); stream clients need RabbitMQ to advertise an address known "
                "before it starts. " + _CI_HINT
            )
        host = redis.get_container_host_ip()
        _wait_redis(redis, host, redis.get_exposed_port(6379), deadline)
        # The stream protocol tells clients where to connect (advertised host/port), so
        # the host port must be known before the broker starts: bind a chosen free port.
        stream_port = _free_port()
        rabbit = (
            DockerContainer(rabbit_image)
            .with_exposed_ports(5672)
            .with_bind_ports(5552, stream_port)
            .with_env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                f'-rabbitmq_stream advertised_host "{host}" '
                f"-rabbitmq_stream advertised_port {stream_port}",
            )
            .with_command(
                [
                    "sh",
                    "-c",
                    "rabbitmq-plugins enable --offline rabbitmq_stream && exec rabbitmq-server",
                ]
            )
        )
        _start(stack, rabbit, "BUSREG_TEST_RABBITMQ_IMAGE")
        started = time.monotonic()
        servers = BusregServers(
            amqp_url=f"amqp://guest:guest@{host}:{rabbit.get_exposed_port(5672)}/",
            redis_url=f"redis://{host}:{redis.get_exposed_port(6379)}/0",
            stream_url=f"rabbitmq-stream://guest:guest@{host}:{stream_port}/",
        )
        asyncio.run(_wait_rabbitmq(rabbit, servers, deadline))
        _log.info("RabbitMQ of %s ready in %.2f s", rabbit_image, time.monotonic() - started)
        yield servers


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
    try:
        with _containers() as servers:
            yield servers
    except _ContainerSetupError as exc:
        pytest.fail(f"busreg.testing, containers: {exc}", pytrace=False)


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
