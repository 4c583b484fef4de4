"""Processes of a bench run: the subprocesses it starts, and CPU/RSS read from /proc.

* every subprocess (workers, the 3-hop relay) is registered in a ``Processes`` pool that
  terminates, then kills, whatever is still alive on exit, error or Ctrl-C;
* CPU is read from ``/proc/<pid>/stat`` (utime + stime) for the worker subprocesses, the
  broker (``beam.smp``) and Redis (``redis-server``) serving the configured ports, and from
  ``getrusage`` for the bench process itself (the load generator).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from busreg.settings import Settings

__all__ = [
    "CpuMeter",
    "Proc",
    "Processes",
    "find_pids",
    "listener_pids",
    "proc_cpu_seconds",
    "proc_rss_kib",
    "server_pids",
    "settings_env",
    "stream_dir_bytes",
]

log = logging.getLogger("busreg.bench")

CLK_TCK = os.sysconf("SC_CLK_TCK")
STREAM_DATA_DIRS = ("/var/lib/rabbitmq/mnesia",)


# --- /proc ---------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all threads), seconds; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process in KiB ({} if unreadable)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        return {}
    return out


def find_pids(comm: str) -> list[int]:
    """Pids whose /proc/<pid>/comm is ``comm`` (e.g. beam.smp, redis-server)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == comm:
                    pids.append(int(entry))
        except OSError:
            continue
    return sorted(pids)


def listener_pids(port: int, comm: str) -> list[int]:
    """Pids named ``comm`` that listen on TCP ``port`` (several brokers may run here: only
    the one we talk to counts); all ``comm`` processes if sockets cannot be matched."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{cols[9]}]")
        except (OSError, StopIteration, ValueError, IndexError):
            continue
    candidates = find_pids(comm)
    found = []
    for pid in candidates:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    found.append(pid)
                    break
            except OSError:
                continue
    return found or candidates


def self_cpu_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class CpuMeter:
    """CPU seconds of labelled process groups between ``start()`` and ``stop()``.

    Labels: ``worker`` (given pids), ``broker`` (beam.smp), ``redis`` (redis-server) and
    ``loadgen`` (this process). The machine is shared, so broker and Redis figures include
    whatever else used them during the window; ``idle()`` measures that background."""

    def __init__(self, worker_pids: Sequence[int], servers: dict[str, list[int]]) -> None:
        self.groups: dict[str, list[int]] = {"worker": list(worker_pids), **servers}
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def _read(self) -> dict[str, float]:
        out = {"loadgen": self_cpu_seconds()}
        for label, pids in self.groups.items():
            out[label] = sum(proc_cpu_seconds(p) or 0.0 for p in pids)
        return out

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._start = self._read()

    def stop(self) -> dict[str, float]:
        """CPU seconds used per label since ``start()``, plus ``wall`` seconds."""
        end = self._read()
        out = {k: max(0.0, end[k] - self._start.get(k, 0.0)) for k in end}
        out["wall"] = time.perf_counter() - self._t0
        return out


def server_pids(settings: Settings) -> dict[str, list[int]]:
    """The broker and Redis processes serving ``settings`` (by listening port)."""
    from urllib.parse import urlsplit

    redis_port = urlsplit(settings.redis_url).port or 6379
    broker: list[int] = []
    for endpoint in settings.stream_endpoints():  # every node of a cluster
        broker += [p for p in listener_pids(endpoint.port, "beam.smp") if p not in broker]
    return {"broker": broker, "redis": listener_pids(redis_port, "redis-server")}


def stream_dir_bytes(namespace: str) -> int | None:
    """Bytes on disk of the namespace's ingest stream segments + indexes (None if the
    broker's data directory is not readable here)."""
    total = 0
    found = False
    marker = f"_{namespace}_ingest-"
    for base in STREAM_DATA_DIRS:
        try:
            nodes = os.listdir(base)
        except OSError:
            continue
        for node in nodes:
            sdir = os.path.join(base, node, "stream")
            try:
                entries = os.listdir(sdir)
            except OSError:
                continue
            for entry in entries:
                if marker not in entry:
                    continue
                found = True
                path = os.path.join(sdir, entry)
                with contextlib.suppress(OSError):
                    for name in os.listdir(path):
                        with contextlib.suppress(OSError):
                            total += os.stat(os.path.join(path, name)).st_size
    return total if found else None


# --- subprocesses ----------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: str
    started: float = field(default_factory=time.perf_counter)
    #: set when the bench itself signalled it (an exit without this is a crash)
    signalled: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


class Processes:
    """Every subprocess the bench starts; ``close()`` ends them all (TERM, then KILL)."""

    def __init__(self) -> None:
        self._procs: list[Proc] = []
        self._logdir = tempfile.mkdtemp(prefix="busreg-bench-")
        atexit.register(self.close)

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        log_path = os.path.join(self._logdir, f"{name}.log")
        with open(log_path, "wb") as logf:
            popen = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf
            )
        proc = Proc(name, popen, log_path)
        self._procs.append(proc)
        log.info("bench: started %s pid=%d", name, popen.pid)
        return proc

    def spawn_worker(self, settings: Settings, worker_id: str) -> Proc:
        argv = [
            sys.executable,
            "-m",
            "busreg",
            "--log-level",
            "WARNING",
            "worker",
            "--worker-id",
            worker_id,
        ]
        return self.spawn(f"worker-{worker_id}", argv, settings_env(settings))

    async def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal ``proc`` and wait for it to exit (SIGKILL after ``timeout``)."""
        proc.signalled = True
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(sig)
        deadline = time.monotonic() + timeout
        # polling another process's exit: there is no event to wait on
        while proc.alive() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if proc.alive():
            log.warning("bench: %s did not exit after signal %d; killing", proc.name, sig)
            with contextlib.suppress(ProcessLookupError):
                proc.popen.kill()
            proc.popen.wait(5)

    def crashes(self) -> list[dict[str, Any]]:
        """Subprocesses that exited before the bench stopped them, with their last lines."""
        return [
            {"name": p.name, "exit_code": p.popen.returncode, "log_tail": p.tail(8)}
            for p in self._procs
            if not p.signalled and not p.alive()
        ]

    def close(self) -> None:
        alive = [p for p in self._procs if p.alive()]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                p.popen.terminate()
        deadline = time.monotonic() + 5
        for p in alive:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.kill()
                p.popen.wait(5)
        self._procs = [p for p in self._procs if p.alive()]


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that makes ``python -m busreg ...`` load exactly ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BUSREG_")}
    env.update(settings.to_env())
    return env
