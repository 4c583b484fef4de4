"""Health checks on real servers (issue 15): a live process whose service fails is DOWN.

A registration with an HTTP check against a real local server: STARTING until the first
pass, UP, DOWN after two 503s, UP again, DOWN when the server hangs past the timeout, UP,
DOWN when the server is killed. Every change reaches a watcher as a ``modified`` delta with
the reason in ``metadata["busreg.check"]``, and the instance keeps heartbeating all along
(it is never removed). A ``busreg register --check tcp://...`` sidecar against a closed
port shows the same from the command line.

Before this, killing only the HTTP server behind a live sidecar left the instance UP for
ever, and callers paid a failed attempt every few seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from busreg import DeltaKind, HttpCheck, Instance, InstanceStatus, Registry, Settings, Worker

from ..checks_http import HealthServer
from .helpers import stop_process

pytestmark = pytest.mark.servers

UP, DOWN, STARTING = InstanceStatus.UP, InstanceStatus.DOWN, InstanceStatus.STARTING
KEY = "busreg.check"


def _is(iid: str, status: InstanceStatus, why: str) -> Callable[[dict[str, Instance]], bool]:
    def check(instances: dict[str, Instance]) -> bool:
        inst = instances.get(iid)
        return (
            inst is not None
            and inst.status is status
            and inst.metadata.get(KEY, "").startswith(why)
        )

    return check


async def test_an_http_check_drives_the_status_while_the_instance_heartbeats(
    busreg_worker: Worker, busreg_registry: Registry
) -> None:
    view = await busreg_registry.watch("hc")
    changes = view.changes()
    timings: dict[str, float] = {}
    async with HealthServer() as server:
        check = HttpCheck(server.url, interval=0.3, timeout=0.2, failures=2, successes=1)
        reg = await busreg_registry.register(
            "hc", address="127.0.0.1:8080", instance_id="hc-1", check=check
        )
        await view.wait_for(_is("hc-1", UP, "check passed"), timeout=10)
        for mode, status, why in [
            ("503", DOWN, "check failed: HTTP 503"),
            ("ok", UP, "check passed"),
            ("hang", DOWN, "check failed: timeout after 0.2s"),
            ("ok", UP, "check passed"),
        ]:
            server.mode = mode  # type: ignore[assignment]
            t0 = time.monotonic()
            await view.wait_for(_is("hc-1", status, why), timeout=10)
            timings[f"{mode} -> {status.value}"] = time.monotonic() - t0
        t0 = time.monotonic()
        await server.kill()
        await view.wait_for(_is("hc-1", DOWN, "check failed:"), timeout=10)
        timings["killed -> DOWN"] = time.monotonic() - t0

    seen: list[tuple[DeltaKind, InstanceStatus]] = []
    while not changes._queue.empty():
        change = await anext(changes)
        seen.append((change.kind, change.instance.status))
    assert seen[0] == (DeltaKind.ADDED, STARTING)  # not called before its first pass
    assert [s for _, s in seen] == [STARTING, UP, DOWN, UP, DOWN, UP, DOWN]
    assert all(kind is DeltaKind.MODIFIED for kind, _ in seen[1:])  # never removed
    assert reg.heartbeats_sent > 0
    assert reg.heartbeats_failed == 0
    # two failures of a 0.3 s check: about 0.6 s, plus the hang's 0.2 s timeouts
    print("\nhealth check:", "; ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    assert max(timings.values()) < 3.0


def _spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def test_a_sidecar_with_a_tcp_check_on_a_closed_port_is_down(
    busreg_worker: Worker, busreg_namespace: Settings
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens there once closed
    async with Registry(busreg_namespace) as watcher:
        view = await watcher.watch("side")
        cmd = [
            sys.executable, "-m", "busreg", "register", "side",
            "--address", "127.0.0.1:9000", "--instance-id", "side-1",
            "--check", f"tcp://127.0.0.1:{port}",
            "--check-interval", "0.3", "--check-timeout", "0.2",
        ]  # fmt: skip
        env = {**os.environ, **busreg_namespace.to_env()}
        proc = _spawn(cmd, env)
        try:
            await view.wait_for(
                _is("side-1", DOWN, "check failed: Connection refused"), timeout=20
            )
        finally:
            await asyncio.to_thread(stop_process, proc, signal.SIGTERM)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        await view.wait_for(lambda i: "side-1" not in i, timeout=10)  # deregistered
