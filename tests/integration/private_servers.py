"""Private RabbitMQ and Redis servers on other ports, for tests that must stop one.

They run beside the shared servers (never instead of them), live for one test session and
are removed afterwards, so the machine stays reusable.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

RABBIT_NODE = "busregtest@localhost"
RABBIT_AMQP_PORT = 5682
RABBIT_STREAM_PORT = 5562
RABBIT_DIST_PORT = 25682
REDIS_PORT = 6391


def _unavailable(what: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"cannot start a private {what} for failure tests", pytrace=False)
    pytest.skip(f"cannot start a private {what} here")


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.05)  # a server process starting up; nothing to wait on but its port
    return False


@dataclass
class PrivateRabbit:
    base: Path
    env: dict[str, str]

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{RABBIT_AMQP_PORT}/"

    @property
    def stream_url(self) -> str:
        return f"rabbitmq-stream://guest:guest@127.0.0.1:{RABBIT_STREAM_PORT}/"

    def ctl(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            ["rabbitmqctl", "-n", RABBIT_NODE, *args],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def stop_app(self) -> None:
        """The broker stops: every connection is closed, nothing is accepted."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        assert _wait_port(RABBIT_STREAM_PORT, 30), "private RabbitMQ stream port did not return"


@contextlib.contextmanager
def private_rabbitmq(
    listeners: str | None = None, ready_port: int = RABBIT_STREAM_PORT
) -> Iterator[PrivateRabbit]:
    """A private node; ``listeners`` replaces the plain AMQP and stream listener lines of
    its rabbitmq.conf (e.g. TLS ones), and ``ready_port`` is the port that says it is up."""
    if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
        _unavailable("RabbitMQ (rabbitmq-server not installed)")
    base = Path(tempfile.mkdtemp(prefix="busreg-rabbit-"))
    (base / "rabbitmq.conf").write_text(
        listeners
        or (
            f"listeners.tcp.1 = 127.0.0.1:{RABBIT_AMQP_PORT}\n"
            f"stream.listeners.tcp.1 = 127.0.0.1:{RABBIT_STREAM_PORT}\n"
        )
    )
    (base / "enabled_plugins").write_text("[rabbitmq_stream].\n")
    with contextlib.suppress(KeyError, PermissionError):
        # the node runs as the rabbitmq user when started by root
        user = pwd.getpwnam("rabbitmq")
        for path in (base, base / "rabbitmq.conf", base / "enabled_plugins"):
            os.chown(path, user.pw_uid, user.pw_gid)
    env = dict(os.environ)
    env.update(
        RABBITMQ_NODENAME=RABBIT_NODE,
        RABBITMQ_NODE_PORT=str(RABBIT_AMQP_PORT),
        RABBITMQ_DIST_PORT=str(RABBIT_DIST_PORT),
        RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
        RABBITMQ_LOG_BASE=str(base / "log"),
        RABBITMQ_CONFIG_FILE=str(base / "rabbitmq"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
    )
    node = PrivateRabbit(base, env)
    started = False
    try:
        subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True, timeout=60)
        started = True
        # the detached node needs a moment before its CLI can even reach it
        deadline = time.monotonic() + 90
        while True:
            try:
                node.ctl("await_startup", "--timeout", "60", timeout=90)
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)  # waiting for another process to boot
        if not _wait_port(ready_port, 30):
            _unavailable("RabbitMQ (stream listener did not open)")
        yield node
    except subprocess.SubprocessError as exc:
        _unavailable(f"RabbitMQ ({exc})")
    finally:
        if started:
            with contextlib.suppress(subprocess.SubprocessError):
                node.ctl("stop", timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class PrivateRedis:
    base: Path
    process: subprocess.Popen[bytes] | None = None
    #: replaces ``--port REDIS_PORT`` (e.g. ``--port 0 --tls-port ...``)
    listen: tuple[str, ...] = ("--port", str(REDIS_PORT))
    ready_port: int = REDIS_PORT

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{REDIS_PORT}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                *self.listen,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.base),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert _wait_port(self.ready_port, 10), "private Redis did not start"

    def kill(self) -> None:
        """Redis dies and loses everything (it keeps nothing on disk)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@contextlib.contextmanager
def private_redis(
    listen: tuple[str, ...] = ("--port", str(REDIS_PORT)), ready_port: int = REDIS_PORT
) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        _unavailable("Redis (redis-server not installed)")
    server = PrivateRedis(Path(tempfile.mkdtemp(prefix="busreg-redis-")), None, listen, ready_port)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(server.base, ignore_errors=True)
