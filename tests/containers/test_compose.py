"""compose/docker-compose.yml for real: RabbitMQ, Redis and two workers from the local
images (brokers/docker.sh images). From the host: register, watch, SIGKILL the worker
container that owns the service's partition and see the other take it over; then bring the
stack down and check nothing is left (containers, networks, bridge, iptables rules).

`docker compose` (v2) is used when the docker CLI has it, else Debian's docker-compose
(v1), which does not know the file's top-level `name:` (v2 only; `-p` names the project
here anyway): v1 gets a copy without that line, run with the compose/ directory as
project directory so the file's relative paths resolve as they do for the original."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from busreg import Registry
from busreg.server.store import PartitionStore
from busreg.settings import Settings
from busreg.transport.connections import connect_redis
from busreg.wire.routing import partition_for
from tests.integration.helpers import eventually

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "compose"
SERVICES = ("rabbitmq", "redis", "worker-1", "worker-2")
PORTS = ("AMQP", "STREAM", "UI", "METRICS", "REDIS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def compose_command(tmp_path: Path) -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose", "-f", str(COMPOSE_DIR / "docker-compose.yml")]
    if shutil.which("docker-compose") is None:
        pytest.fail("needs `docker compose` or docker-compose (apt-get install docker-compose)")
    text = (COMPOSE_DIR / "docker-compose.yml").read_text()
    v1 = tmp_path / "docker-compose.v1.yml"
    v1.write_text("".join(ln for ln in text.splitlines(True) if not ln.startswith("name:")))
    return ["docker-compose", "--project-directory", str(COMPOSE_DIR), "-f", str(v1)]


def docker(*args: str) -> str:
    return subprocess.run(
        ["docker", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()


def iptables_rules() -> list[str]:
    out = []
    for table in ("filter", "nat"):
        out += subprocess.run(
            ["iptables", "-t", table, "-S"], check=True, capture_output=True, text=True
        ).stdout.splitlines()
    return out


@dataclass
class Stack:
    project: str
    compose: list[str]
    env: dict[str, str]
    settings: Settings

    def run(self, *args: str, timeout: float = 240) -> None:
        proc = subprocess.run(
            [*self.compose, "-p", self.project, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, f"compose {args[0]}: {proc.stdout}{proc.stderr}"

    def labelled(self, kind: str) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        return docker(kind, "ls", "-aq" if kind == "container" else "-q", "--filter", label).split()

    def hostname(self, service: str) -> str:
        cid = docker(
            "ps", "-q", "--filter", f"label=com.docker.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}",
        )  # fmt: skip
        return docker("inspect", "-f", "{{.Config.Hostname}}", cid)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    ports = {p: free_port() for p in PORTS}
    env = dict(os.environ)
    env.update({f"BUSREG_COMPOSE_{p}_PORT": str(port) for p, port in ports.items()})
    settings = Settings(
        # the stack's own user (brokers/rabbitmq/definitions.json) and namespace
        amqp_url=f"amqp://busreg:busreg@127.0.0.1:{ports['AMQP']}/",
        # the broker advertises "rabbitmq:5552", which the host cannot resolve: connect
        # through the published port as through a load balancer
        stream_url=f"rabbitmq-stream://busreg:busreg@127.0.0.1:{ports['STREAM']}/",
        stream_load_balancer=True,
        redis_url=f"redis://127.0.0.1:{ports['REDIS']}/0",
        namespace="busreg",
        partitions=8,
    )
    stack = Stack(f"busreg-ci-{uuid.uuid4().hex[:8]}", compose_command(tmp_path), env, settings)
    try:
        yield stack
    finally:
        stack.run("down", "-v", "--remove-orphans", "-t", "10")


async def owners(settings: Settings) -> dict[int, str]:
    """Worker id (``<container host name>-<pid>-<random>``) owning each partition, from Redis."""
    redis = await connect_redis(settings)
    try:
        store = PartitionStore(redis, settings.namespace)
        holders = {k: await store.owner(k) for k in range(settings.partitions)}
    finally:
        await redis.aclose()
    return {k: h.split("|", 1)[0] for k, h in holders.items() if h}


async def test_stack_up_takeover_and_down(stack: Stack) -> None:
    rules_before = iptables_rules()
    links_before = set(os.listdir("/sys/class/net"))
    await asyncio.to_thread(stack.run, "up", "-d", "--no-build", *SERVICES)
    settings = stack.settings
    # both workers up: every partition owned, by the two containers between them
    hosts = {stack.hostname("worker-1"), stack.hostname("worker-2")}

    await eventually(
        lambda: owners(settings),
        lambda got: len(got) == 8 and {o.split("-")[0] for o in got.values()} == hosts,
        timeout=90,
        what="both workers owning the 8 partitions between them",
    )

    async with Registry(settings, name="compose-test") as registry:
        view = await registry.watch("inventory")
        await registry.register("inventory", address="10.1.0.1:80", instance_id="inv-1")
        await view.wait_for(lambda instances: "inv-1" in instances, timeout=15)

        k = partition_for("inventory", 8)
        owner = (await owners(settings))[k]
        victim = next(s for s in ("worker-1", "worker-2") if owner.startswith(stack.hostname(s)))
        survivor = ({"worker-1", "worker-2"} - {victim}).pop()
        survivor_host = stack.hostname(survivor)
        await asyncio.to_thread(stack.run, "kill", victim)  # SIGKILL: no hand-over

        new_owner = (
            await eventually(
                lambda: owners(settings),
                lambda got: got.get(k, "").startswith(survivor_host),
                timeout=60,
                what=f"{survivor} owning partition {k}",
            )
        )[k]
        print(f"partition {k}: {owner} -> {new_owner}")
        # the new owner applies events: a second instance shows up, the first stayed
        await registry.register("inventory", address="10.1.0.2:80", instance_id="inv-2")
        await view.wait_for(lambda i: {"inv-1", "inv-2"} <= set(i), timeout=15)

    await asyncio.to_thread(stack.run, "down", "-v", "--remove-orphans", "-t", "10")
    assert stack.labelled("container") == []
    assert stack.labelled("network") == []
    assert set(os.listdir("/sys/class/net")) == links_before
    assert iptables_rules() == rules_before
