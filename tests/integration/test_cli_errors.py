"""What ``busreg`` says when a server is not where the settings say (issue 15, section 4):
one line on stderr naming the cause, exit 1; no library log lines, no Python reprs."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aio_pika
import pytest

from busreg import Registry, Settings, Worker
from busreg import constants as c
from busreg.transport.connections import connect_amqp

from .helpers import eventually, owners, spawn_worker, stop_process

pytestmark = pytest.mark.servers


def _busreg(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "busreg", *args],
        env={**os.environ, **settings.to_env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("busreg: error: ")
    assert "object at 0x" not in lines[0]
    return lines[0]


def _amqp(settings: Settings, port: int, vhost: str = "") -> str:
    return settings.amqp_urls()[0].rsplit(":", 1)[0] + f":{port}/{vhost}"


def test_a_wrong_stream_port_is_named_as_refused(busreg_namespace: Settings) -> None:
    wrong = {
        "BUSREG_STREAM_URL": "rabbitmq-stream://guest:guest@127.0.0.1:1/",
        "BUSREG_CLIENT__CONFIRM_TIMEOUT": "1",
    }
    args = ["register", "inv", "--address", "127.0.0.1:80"]
    line = _one_line(_busreg(busreg_namespace, *args, **wrong))
    assert "stream connect to 127.0.0.1:1: RabbitMQ unreachable (Connection refused)" in line


def test_a_wrong_amqp_port_is_named_as_refused(busreg_namespace: Settings) -> None:
    url = _amqp(busreg_namespace, 1)
    line = _one_line(_busreg(busreg_namespace, "ls", BUSREG_AMQP_URL=url))
    assert line.endswith("RabbitMQ unreachable (Connection refused)")


def test_an_unknown_vhost_is_named(busreg_namespace: Settings) -> None:
    port = int(busreg_namespace.amqp_urls()[0].rsplit(":", 1)[1].split("/")[0])
    url = _amqp(busreg_namespace, port, "no-such-vhost")
    line = _one_line(_busreg(busreg_namespace, "ls", BUSREG_AMQP_URL=url))
    assert "no such vhost, or the user may not use it" in line


def test_status_on_a_redis_without_the_namespace_says_so(busreg_namespace: Settings) -> None:
    """No worker ever ran this namespace with this Redis (a wrong DB, say): not an outage
    table with no workers and rc 0, but one line saying where to look."""
    line = _one_line(_busreg(busreg_namespace, "status"))
    assert f"has no state for namespace {busreg_namespace.namespace!r}" in line
    assert "check the database in BUSREG_REDIS_URL" in line


def test_a_worker_whose_metrics_port_is_taken_never_says_it_started(
    busreg_namespace: Settings,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _busreg(
            busreg_namespace, "worker", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"
        )
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"busreg: error: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    )
    assert "worker started" not in result.stderr


async def test_ls_and_watch_of_a_misspelt_service_hint_at_the_name(
    busreg_worker: Worker, busreg_registry: Registry, busreg_namespace: Settings
) -> None:
    await busreg_registry.register("inventory", address="127.0.0.1:8080", instance_id="i-1")
    # off the loop: the worker answering the CLI's requests runs on it
    ls = await asyncio.to_thread(_busreg, busreg_namespace, "ls", "inventroy")
    assert ls.returncode == 0, ls.stderr
    assert ls.stdout.startswith("inventroy  revision 0  (0 instances)")
    hint = "busreg: 'inventroy' has never had an instance (revision 0); did you mean inventory?"
    assert hint in ls.stderr
    watch = await asyncio.to_thread(
        _busreg, busreg_namespace, "watch", "inventroy", "--duration", "0.1"
    )
    assert watch.returncode == 0, watch.stderr
    assert hint in watch.stderr
    known = await asyncio.to_thread(_busreg, busreg_namespace, "ls", "inventory")
    assert "never had an instance" not in known.stderr
    # the exchange `watch` declared for the service that never had an instance is gone
    # with it (before, each such watch left a durable exchange no cleanup knew of)
    conn = await connect_amqp(busreg_namespace, "test-cleanup")
    try:
        channel = await conn.channel()
        name = c.service_exchange(busreg_namespace.namespace, "inventroy")
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.declare_exchange(name, passive=True)
    finally:
        await conn.close()


async def test_a_healthy_start_and_an_idle_stop_log_no_warning(
    busreg_namespace: Settings, tmp_path: Path
) -> None:
    """Issue 15 §5: a fresh worker logged `tick failed: no confirm` for several partitions in
    its first second, and an idle one's SIGTERM took ~5.5 s with "drain deadline passed;
    cancelling". A healthy start and an idle stop log no warning (but the auth-off notice),
    release every partition and exit 0 well within the drain deadline."""
    log_path = tmp_path / "worker.log"
    proc = spawn_worker(busreg_namespace, "w-quiet", log_path)
    try:
        want = set(range(busreg_namespace.partitions))
        await eventually(
            lambda: owners(busreg_namespace),
            lambda o: {k for k, w in o.items() if w == "w-quiet"} == want,
            timeout=30,
            what="every partition owned",
        )
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 15)
    finally:
        stop_process(proc, signal.SIGKILL)
    text = log_path.read_text()
    assert rc == 0, text
    warnings = [
        line
        for line in text.splitlines()
        if (" WARNING " in line or " ERROR " in line) and "auth is OFF" not in line
    ]
    assert warnings == [], "\n".join(warnings)
    assert text.count("partition released") == busreg_namespace.partitions, text
