"""The demo's child processes: ``busreg`` subprocesses (workers, a registered instance),
their environment and log files, and ending them (SIGKILL for a crash, SIGTERM at the end)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from busreg.settings import Settings

__all__ = ["Child", "Children", "child_env"]

#: Envs that must not reach the demo's workers (two of them share the host).
_CHILD_ENV_DROP = frozenset({"WORKER__METRICS_PORT", "WORKER__METRICS_HOST", "WORKER__WORKER_ID"})


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def tail(self, lines: int = 8) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""


class Children:
    """The demo's subprocesses; ``close()`` ends whatever is still running."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self._env = env
        self._logdir = logdir
        self.all: list[Child] = []

    async def spawn(self, name: str, *args: str) -> Child:
        log_path = self._logdir / f"{name}.log"
        with _log_file(log_path) as logf:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "busreg",
                "--log-level",
                "WARNING",
                *args,
                env=self._env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=asyncio.subprocess.STDOUT,
            )
        child = Child(name, proc, log_path)
        self.all.append(child)
        return child

    async def kill(self, child: Child) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()
        await child.proc.wait()

    async def close(self) -> None:
        """SIGTERM every child still running (workers hand over), SIGKILL after 10 s."""
        running = [ch for ch in self.all if ch.alive]
        for ch in running:
            with contextlib.suppress(ProcessLookupError):
                ch.proc.terminate()
        for ch in running:
            try:
                async with asyncio.timeout(10):
                    await ch.proc.wait()
            except TimeoutError:
                await self.kill(ch)

    def crashed(self) -> list[Child]:
        return [ch for ch in self.all if ch.proc.returncode not in (None, 0, -signal.SIGKILL)]


def _log_file(path: Path) -> BinaryIO:
    return path.open("wb")  # a local file: opening it does not block the loop noticeably


def child_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BUSREG_")}
    env.update(settings.to_env(exclude=_CHILD_ENV_DROP), PYTHONUNBUFFERED="1")
    return env
