"""TLS end to end: a private RabbitMQ node that only listens with TLS (AMQP and stream
protocol) and a private Redis that only listens with TLS; a worker and a client work through
``amqps://``, ``rabbitmq-stream+tls://`` and ``rediss://`` URLs, and a client that does not
trust the servers' CA is refused with a busreg error."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from busreg import ConnectionFailed, Registry, Settings
from busreg.ops.admin import applied_namespace
from busreg.settings import ClientSettings, WorkerSettings
from busreg.testing import running_worker
from busreg.transport.connections import connect_redis

from .private_servers import _unavailable, private_rabbitmq, private_redis

pytestmark = pytest.mark.servers

AMQPS_PORT = 5683
STREAM_TLS_PORT = 5563
REDIS_TLS_PORT = 6392


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_dir() -> Iterator[Path]:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1."""
    if shutil.which("openssl") is None:
        _unavailable("TLS setup (openssl not installed)")
    path = Path(tempfile.mkdtemp(prefix="busreg-tls-"))
    try:
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=busreg test CA",
            cwd=path,
        )  # fmt: skip
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
            "-out", "server.csr", "-subj", "/CN=localhost",
            cwd=path,
        )  # fmt: skip
        (path / "ext.cnf").write_text(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
            "basicConstraints=CA:FALSE\n"
            "keyUsage=digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
        )
        _openssl(
            "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
            cwd=path,
        )  # fmt: skip
        # the broker runs as the rabbitmq user: a test-only key may be world-readable
        path.chmod(0o755)
        for f in path.iterdir():
            f.chmod(0o644)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_worker_and_client_work_over_tls_only(
    tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listeners = (
        "listeners.tcp = none\n"
        f"listeners.ssl.1 = 127.0.0.1:{AMQPS_PORT}\n"
        "stream.listeners.tcp = none\n"
        f"stream.listeners.ssl.1 = 127.0.0.1:{STREAM_TLS_PORT}\n"
        f"ssl_options.cacertfile = {tls_dir / 'ca.pem'}\n"
        f"ssl_options.certfile = {tls_dir / 'server.pem'}\n"
        f"ssl_options.keyfile = {tls_dir / 'server.key'}\n"
        "ssl_options.verify = verify_none\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
    )
    redis_tls = (
        "--port", "0", "--tls-port", str(REDIS_TLS_PORT),
        "--tls-cert-file", str(tls_dir / "server.pem"),
        "--tls-key-file", str(tls_dir / "server.key"),
        "--tls-ca-cert-file", str(tls_dir / "ca.pem"),
        "--tls-auth-clients", "no",
    )  # fmt: skip
    with (
        private_rabbitmq(listeners, ready_port=STREAM_TLS_PORT),
        private_redis(redis_tls, ready_port=REDIS_TLS_PORT),
    ):
        settings = Settings(
            amqp_url=f"amqps://guest:guest@localhost:{AMQPS_PORT}/",
            stream_url=f"rabbitmq-stream+tls://guest:guest@localhost:{STREAM_TLS_PORT}/",
            redis_url=f"rediss://localhost:{REDIS_TLS_PORT}/0",
            namespace=f"tls{uuid.uuid4().hex[:8]}",
            partitions=2,
            worker=WorkerSettings(lease_ttl=1.5),
            client=ClientSettings(heartbeat_interval=0.5, ttl=2.0, request_timeout=5.0),
        )
        # busreg verifies servers against the system CA store; OpenSSL reads this variable
        # whenever a default context is made, so the test CA is trusted from here on
        monkeypatch.setenv("SSL_CERT_FILE", str(tls_dir / "ca.pem"))
        async with (
            applied_namespace(settings) as ns,
            running_worker(ns),
            Registry(ns, name="tls-client") as client,
        ):
            view = await client.watch("secure", resync_interval=None)
            await client.register("secure", address="127.0.0.1:443", instance_id="tls-1")
            await view.wait_for(lambda i: "tls-1" in i, timeout=15)
            snap = await client.snapshot("secure")
            assert [i.instance_id for i in snap.instances] == ["tls-1"]
        # without the CA the servers' certificates are not trusted: a clear busreg error
        monkeypatch.delenv("SSL_CERT_FILE")
        with pytest.raises(ConnectionFailed, match=r"Redis .*CERTIFICATE_VERIFY_FAILED"):
            await connect_redis(settings)
