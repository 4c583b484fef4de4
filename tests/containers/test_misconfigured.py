"""The container branch's usual misconfigurations end in one clear message, fast, instead
of a 120 s wait: each case runs a user's one-test project in a child pytest (CI=true, no
BUSREG_TEST_* URLs) with one thing wrong, and checks what it says and how long it took."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

#: the stand-in RabbitMQ with Debian's default: guest may log in from localhost only
LOOPBACK_IMAGE = "busreg-ci/rabbitmq-loopback-only:3.10"


@pytest.fixture(scope="module")
def loopback_only_image() -> Iterator[str]:
    client = docker.from_env()
    base = os.environ.get("BUSREG_TEST_RABBITMQ_IMAGE") or "rabbitmq:3.10-management"
    dockerfile = f"FROM {base}\nRUN rm -f /etc/rabbitmq/conf.d/10-defaults.conf\n"
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=LOOPBACK_IMAGE, rm=True)
    yield LOOPBACK_IMAGE
    client.images.remove(LOOPBACK_IMAGE, force=True)
    client.close()


def run_project(tmp_path: Path, **changes: str) -> tuple[int, str, float]:
    (tmp_path / "test_project.py").write_text("def test_servers(busreg_servers):\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUSREG_TEST_") or "IMAGE" in k}
    env.update(changes, CI="true")
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_project.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def containers() -> set[str]:
    client = docker.from_env()
    try:
        return {c.id for c in client.containers.list(all=True)}
    finally:
        client.close()


@pytest.mark.parametrize(
    ("changes", "says", "within"),
    [
        pytest.param(
            {"TESTCONTAINERS_RYUK_DISABLED": "false"},
            "TESTCONTAINERS_RYUK_DISABLED=true",
            30,
            id="ryuk-not-disabled",
        ),
        pytest.param(
            {"TC_HOST": "192.0.2.1"},  # TEST-NET-1: nothing answers there
            "did not answer at 192.0.2.1",
            45,
            id="wrong-tc-host",
        ),
        pytest.param(
            {"BUSREG_TEST_REDIS_IMAGE": "busreg-ci/no-such-image:0"},
            "set BUSREG_TEST_REDIS_IMAGE",
            30,
            id="missing-image",
        ),
    ],
)
def test_clear_message(tmp_path: Path, changes: dict[str, str], says: str, within: float) -> None:
    before = containers()
    rc, out, took = run_project(tmp_path, **changes)
    assert rc == 1, out
    assert says in out, out
    assert took < within, f"took {took:.1f}s\n{out}"
    assert containers() == before  # whatever started was removed


def test_login_refused_from_host(tmp_path: Path, loopback_only_image: str) -> None:
    before = containers()
    rc, out, took = run_project(tmp_path, BUSREG_TEST_RABBITMQ_IMAGE=loopback_only_image)
    assert rc == 1, out
    assert "loopback_users.guest = false" in out, out
    assert took < 60, f"took {took:.1f}s\n{out}"
    assert containers() == before
