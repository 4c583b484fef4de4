"""Health checks: an instance whose process is alive but whose service is not is marked DOWN.

A registration heartbeats as long as its process runs. A check asks the service itself, every
``interval``: an HTTP GET (``HttpCheck``, 2xx/3xx is healthy), a TCP connect (``TcpCheck``) or
a command's exit status (``CommandCheck``), each bounded by ``timeout``. ``failures``
consecutive failed checks turn the instance DOWN, ``successes`` passing ones turn it UP
again; until the first pass it is STARTING, so a slow-starting app is not called early. The
instance keeps heartbeating meanwhile (it is alive; its service is not).

A status change is published at once as a re-registration, so watchers get a ``modified``
delta and balancers stop choosing the instance within one check interval. Why it changed is
in the instance's metadata under ``busreg.check`` (``"check failed: HTTP 503"``,
``"check failed: timeout after 2.0s"``, ``"check passed"``): a metadata entry rather than a
new event field, because workers refuse fields they do not know, and a rolling upgrade must
not dead-letter the heartbeats of upgraded instances.

    check = HttpCheck("http://127.0.0.1:8080/health", interval=2.0, timeout=1.0)
    reg = await registry.register("inventory", address="10.0.0.7:8080", check=check)

``CheckGate`` (the thresholds) is pure and has unit tests; the probes do I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
from dataclasses import dataclass, field
from typing import Protocol

from busreg.errors import ConfigurationError
from busreg.wire.models import InstanceStatus

__all__ = [
    "CHECK_METADATA_KEY",
    "CheckGate",
    "CheckResult",
    "CommandCheck",
    "HealthCheck",
    "HttpCheck",
    "TcpCheck",
    "parse_check",
]

#: Where a registration's metadata says what its last check status change was about.
CHECK_METADATA_KEY = "busreg.check"


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    detail: str  # "HTTP 503", "timeout after 2.0s", "connection refused", "exit 1: ..."


@dataclass(frozen=True, kw_only=True)
class _Timing:
    interval: float = 5.0
    timeout: float = 2.0
    failures: int = 2  # consecutive failed checks before DOWN
    successes: int = 1  # consecutive passing checks before UP again

    def __post_init__(self) -> None:
        if not (0 < self.timeout <= 60 and 0 < self.interval <= 3600):
            raise ConfigurationError("check interval and timeout must be positive, timeout ≤ 60 s")
        if self.timeout > self.interval:
            raise ConfigurationError(
                f"check timeout {self.timeout}s must not exceed its interval {self.interval}s"
            )
        if self.failures < 1 or self.successes < 1:
            raise ConfigurationError("check failures and successes thresholds must be ≥ 1")


class HealthCheck(Protocol):
    """What ``Registry.register(check=...)`` runs: yours too, if it has these."""

    @property
    def interval(self) -> float: ...
    @property
    def timeout(self) -> float: ...
    @property
    def failures(self) -> int: ...
    @property
    def successes(self) -> int: ...

    async def probe(self) -> CheckResult: ...


@dataclass(frozen=True)
class HttpCheck(_Timing):
    """GET ``url``; healthy on 2xx and 3xx (needs httpx: ``pip install 'busreg[http]'``)."""

    url: str

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.url.startswith(("http://", "https://")):
            raise ConfigurationError(f"HTTP check {self.url!r}: use http:// or https://")
        if importlib.util.find_spec("httpx") is None:  # say so now, not at every probe
            raise ConfigurationError("HTTP checks need httpx: pip install 'busreg[http]'")

    async def probe(self) -> CheckResult:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client:
                response = await client.get(self.url)
        except httpx.TimeoutException:
            return CheckResult(False, f"timeout after {self.timeout}s")
        except httpx.HTTPError as exc:
            return CheckResult(False, _short(exc) or type(exc).__name__)
        ok = 200 <= response.status_code < 400
        return CheckResult(ok, f"HTTP {response.status_code}")


@dataclass(frozen=True)
class TcpCheck(_Timing):
    """Connect to ``host:port``; healthy if the connection is accepted."""

    host: str
    port: int

    async def probe(self) -> CheckResult:
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            return CheckResult(False, f"timeout after {self.timeout}s")
        except OSError as exc:
            # asyncio's own wording ("Connect call failed (...)") hides the errno's
            reason = os.strerror(exc.errno) if exc.errno else _short(exc)
            return CheckResult(False, f"{reason} ({self.host}:{self.port})")
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return CheckResult(True, f"connected to {self.host}:{self.port}")


@dataclass(frozen=True)
class CommandCheck(_Timing):
    """Run ``command`` in a shell; healthy on exit status 0 (killed after ``timeout``)."""

    command: str

    async def probe(self) -> CheckResult:
        proc = await asyncio.create_subprocess_shell(
            self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: a timeout kills its children too
        )
        try:
            async with asyncio.timeout(self.timeout):
                _, err = await proc.communicate()
        except TimeoutError:
            # the shell alone would leave its children holding stderr (and us waiting)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            return CheckResult(False, f"timeout after {self.timeout}s")
        if proc.returncode == 0:
            return CheckResult(True, "exit 0")
        last = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
        tail = f": {last[0][:120]}" if last[0] else ""
        return CheckResult(False, f"exit {proc.returncode}{tail}")


def parse_check(
    target: str | None, command: str | None = None, **timing: float
) -> HealthCheck | None:
    """The check a sidecar's options describe: ``target`` is ``http(s)://...`` or
    ``tcp://host:port``, or ``command`` a shell command (one of them, or neither).

    >>> parse_check("tcp://127.0.0.1:5432", interval=2.0, timeout=1.0)
    TcpCheck(interval=2.0, timeout=1.0, failures=2, successes=1, host='127.0.0.1', port=5432)
    """
    if target and command:
        raise ConfigurationError("give one health check: --check or --check-cmd, not both")
    if command:
        return CommandCheck(command, **timing)  # type: ignore[arg-type]
    if not target:
        return None
    if target.startswith(("http://", "https://")):
        return HttpCheck(target, **timing)  # type: ignore[arg-type]
    if target.startswith("tcp://"):
        host, _, port = target.removeprefix("tcp://").rstrip("/").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigurationError(f"TCP check {target!r}: must look like tcp://host:port")
        return TcpCheck(host.strip("[]"), int(port), **timing)  # type: ignore[arg-type]
    raise ConfigurationError(
        f"health check {target!r}: use http://..., https://... or tcp://host:port"
    )


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""


@dataclass
class CheckGate:
    """Thresholds over consecutive check results; pure.

    >>> gate = CheckGate(failures=2, successes=1)
    >>> gate.status, gate.observe(CheckResult(True, "HTTP 200"))
    (<InstanceStatus.STARTING: 'STARTING'>, (<InstanceStatus.UP: 'UP'>, 'check passed'))
    >>> gate.observe(CheckResult(False, "HTTP 503")) is None  # one failure: not yet
    True
    >>> gate.observe(CheckResult(False, "HTTP 503"))
    (<InstanceStatus.DOWN: 'DOWN'>, 'check failed: HTTP 503')
    """

    failures: int
    successes: int
    status: InstanceStatus = InstanceStatus.STARTING
    _failed: int = field(default=0, repr=False)
    _passed: int = field(default=0, repr=False)

    def observe(self, result: CheckResult) -> tuple[InstanceStatus, str] | None:
        """The new (status, reason) if this result changes the status, else None."""
        if result.ok:
            self._failed, self._passed = 0, self._passed + 1
            # a starting instance is UP at its first pass; a DOWN one after `successes`
            needed = 1 if self.status is InstanceStatus.STARTING else self.successes
            if self.status is not InstanceStatus.UP and self._passed >= needed:
                self.status = InstanceStatus.UP
                return self.status, "check passed"
            return None
        self._passed, self._failed = 0, self._failed + 1
        if self.status is not InstanceStatus.DOWN and self._failed >= self.failures:
            self.status = InstanceStatus.DOWN
            return self.status, f"check failed: {result.detail}"
        return None
