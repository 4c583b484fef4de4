"""Helpers for multi-process tests: real worker, registrant and gateway processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from busreg import Settings
from busreg.server.store import PartitionStore
from busreg.transport.connections import connect_redis

HERE = Path(__file__).parent
T = TypeVar("T")


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a child process use ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BUSREG_")}
    env.update(settings.to_env(), PYTHONUNBUFFERED="1", **extra)
    return env


def spawn_worker(settings: Settings, worker_id: str, log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    return subprocess.Popen(
        [sys.executable, "-m", "busreg", "worker", "--worker-id", worker_id],
        env=settings_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


async def eventually(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], *, timeout: float, what: str
) -> T:
    """Poll another process's observable state until ``ok`` holds (deadline: hang guard).

    Used only where the state lives in another process and offers no notification."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
        await asyncio.sleep(0.02)


async def owners(settings: Settings) -> dict[int, str | None]:
    """Partition -> owning worker id, read from the lease keys in Redis."""
    redis = await connect_redis(settings)
    try:
        store = PartitionStore(redis, settings.namespace)
        out: dict[int, str | None] = {}
        for k in range(settings.partitions):
            holder = await store.owner(k)
            out[k] = holder.split("|", 1)[0] if holder else None
        return out
    finally:
        await redis.aclose()


async def partition_states(settings: Settings) -> dict[int, dict[str, str]]:
    redis = await connect_redis(settings)
    try:
        store = PartitionStore(redis, settings.namespace)
        return {k: await store.partition_state(k) for k in range(settings.partitions)}
    finally:
        await redis.aclose()


async def delete_service_exchanges(settings: Settings, *services: str) -> None:
    """Delete the exchanges of ``services``: the namespace cleanup knows only the services
    Redis has revisions for, not those a test merely watched."""
    from busreg import constants as c
    from busreg.transport.connections import connect_amqp

    conn = await connect_amqp(settings, "test-exchange-cleanup")
    try:
        channel = await conn.channel()
        for service in services:
            await channel.exchange_delete(c.service_exchange(settings.namespace, service))
    finally:
        await conn.close()


# --- gateway processes ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@dataclass
class GatewayProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> int:
        stop_process(self.proc)
        return self.proc.returncode


def spawn_logged(
    cmd: list[str], env: dict[str, str], log: Path, **kw: Any
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, **kw)


@contextlib.asynccontextmanager
async def gateway_process(
    settings: Settings, log: Path, *args: str, **env: str
) -> AsyncIterator[GatewayProcess]:
    """A real ``busreg gateway`` for ``settings``' namespace on a free port, healthy (200
    /healthz) before it is yielded; SIGTERMed (and killed if it hangs) afterwards."""
    port = free_port()
    environment = settings_env(
        settings,
        BUSREG_GATEWAY__PORT=str(port),
        BUSREG_GATEWAY__REFRESH="0.2",  # new services are watched within 0.2 s
        **env,
    )
    proc = spawn_logged([sys.executable, "-m", "busreg", "gateway", *args], environment, log)
    gw = GatewayProcess(f"http://127.0.0.1:{port}", proc, log)
    headers = (
        {"authorization": f"Bearer {env['BUSREG_GATEWAY__AUTH__TOKEN']}"}
        if ("BUSREG_GATEWAY__AUTH__TOKEN" in env)
        else {}
    )
    try:
        await until_ok(proc, f"{gw.url}/healthz", log, "gateway", headers)
        yield gw
    finally:
        await asyncio.to_thread(stop_process, proc)


async def until_ok(
    proc: subprocess.Popen[bytes],
    url: str,
    log: Path,
    what: str,
    headers: dict[str, str] | None = None,
) -> None:
    """Until ``url`` answers 200 (a server process starting); its log if it exits first."""
    async with httpx.AsyncClient(timeout=2.0, headers=headers) as http:

        async def status() -> int:
            if proc.poll() is not None:
                raise AssertionError(f"{what} exited {proc.returncode}:\n{log_tail(log)}")
            try:
                return (await http.get(url)).status_code
            except httpx.TransportError:
                return 0

        await eventually(status, lambda code: code == 200, timeout=30, what=f"{what} ready")
