"""Prometheus metrics: a live worker's /metrics after traffic, and a client's collector."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from busreg import Registry, Settings
from busreg import constants as c
from busreg.client.metrics import RegistryCollector
from busreg.settings import WorkerSettings
from busreg.testing import running_worker
from busreg.transport.streams import StreamWriter

from .helpers import eventually, owners, settings_env, stop_process

pytestmark = pytest.mark.servers

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _spawn_worker(
    settings: Settings, worker_id: str, port: int, log_path: Path
) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    return subprocess.Popen(
        [
            sys.executable, "-m", "busreg", "worker",
            "--worker-id", worker_id, "--metrics-port", str(port),
        ],
        env=settings_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip


def _parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


async def _scrape(port: int) -> Samples:
    status, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return _parse(text)


def _total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def _per_partition(samples: Samples, name: str) -> dict[int, float]:
    return {
        int(dict(labels)["partition"]): v
        for (n, labels), v in samples.items()
        if n == name and "partition" in dict(labels)
    }


async def test_live_worker_serves_metrics(
    busreg_namespace: Settings, busreg_registry: Registry, tmp_path: Path
) -> None:
    settings = busreg_namespace
    parts = settings.partitions
    port = _free_port()
    proc = _spawn_worker(settings, "metrics-w1", port, tmp_path / "worker.log")
    try:
        await eventually(
            lambda: owners(settings),
            lambda o: all(w == "metrics-w1" for w in o.values()),
            timeout=20,
            what="the worker owns every partition",
        )
        # traffic: a few instances of two services, a watcher, and one malformed event
        for n in range(3):
            await busreg_registry.register("inventory", address=f"127.0.0.1:81{n:02d}")
        await busreg_registry.register("cart", address="127.0.0.1:8200")
        view = await busreg_registry.watch("inventory")
        await view.wait_for(lambda i: len(i) == 3, timeout=10)
        writer = StreamWriter(settings, "metrics-test-garbage")
        try:
            await writer.send(c.ingest_partition(settings.namespace, 0), b"not json", 5)
        finally:
            await writer.close()

        def dead_lettered(samples: Samples) -> bool:
            key = ("busreg_partition_events_dead_lettered_total",
                   (("partition", "0"), ("reason", "malformed")))  # fmt: skip
            return samples.get(key, 0) >= 1

        samples = await eventually(
            lambda: _scrape(port), dead_lettered, timeout=10, what="the dead letter counted"
        )
        await asyncio.sleep(1.1)  # past the probe's rate limit: a fresh Redis/stream read
        samples = await _scrape(port)

        assert samples[("busreg_worker_owned_partitions", ())] == parts
        assert samples[("busreg_worker_live_workers", ())] == 1
        info = [labels for (n, labels), _ in samples.items() if n == "busreg_worker_info"]
        assert dict(info[0])["worker_id"] == "metrics-w1"
        assert _total(samples, "busreg_partition_events_applied_total") >= 4
        assert _total(samples, "busreg_partition_deltas_published_total") >= 4
        assert _total(samples, "busreg_partition_apply_batches_total") > 0
        # the registrations' batches made their way to a publish: each hop was timed
        batches = _total(samples, "busreg_partition_delta_batches_total")
        assert batches >= 1
        hops: dict[str, float] = {}
        for (n, labels), v in samples.items():
            if n == "busreg_partition_delta_hop_seconds_total":  # summed over partitions
                hop = dict(labels)["hop"]
                hops[hop] = hops.get(hop, 0.0) + v
        assert set(hops) == {"deliver", "queue", "apply", "handoff", "confirm"}
        assert hops["apply"] > 0
        assert hops["confirm"] > 0
        assert hops["apply"] / batches < 1.0  # seconds, not milliseconds
        assert samples[("busreg_worker_snapshot_requests_total", ())] >= 1
        assert samples[("busreg_apply_batch_size_count", ())] > 0
        assert samples[("busreg_apply_batch_size_sum", ())] >= 5
        assert samples[("busreg_apply_duration_seconds_count", ())] > 0
        assert samples[("busreg_apply_duration_seconds_bucket", (("le", "+Inf"),))] > 0
        offsets = _per_partition(samples, "busreg_partition_committed_offset")
        assert sorted(offsets) == list(range(parts))
        assert all(v >= 0 for v in offsets.values())  # ticks move every owned partition
        assert sorted(_per_partition(samples, "busreg_partition_outbox_depth")) == list(
            range(parts)
        )
        lag = _per_partition(samples, "busreg_partition_lag_events")
        assert sorted(lag) == list(range(parts))
        assert all(0 <= v < 1000 for v in lag.values())
        age = _per_partition(samples, "busreg_partition_watermark_age_seconds")
        assert sorted(age) == list(range(parts))
        assert all(0 <= v < 5 for v in age.values())
        assert _total(samples, "process_resident_memory_bytes") > 0

        status, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/nothing")
        assert status == 404
    finally:
        stop_process(proc, signal.SIGTERM)
    assert proc.returncode == 0, (tmp_path / "worker.log").read_text()


async def test_in_process_worker_and_client_metrics(busreg_namespace: Settings) -> None:
    settings = busreg_namespace.model_copy(
        update={
            "worker": WorkerSettings.model_validate(
                busreg_namespace.worker.model_dump() | {"metrics_port": 0}
            )
        }
    )
    async with running_worker(settings) as worker, Registry(settings) as registry:
        assert worker.metrics is not None
        port = worker.metrics.port
        assert port > 0  # port 0 asked for a free one
        await registry.register("inventory", address="127.0.0.1:8101", instance_id="i-1")
        reg = await registry.register("inventory", address="127.0.0.1:8102", instance_id="i-2")
        view = await registry.watch("inventory")
        await view.wait_for(lambda i: len(i) == 2, timeout=10)
        await asyncio.sleep(settings.client.heartbeat_interval * 2.5)
        await reg.deregister()
        await view.wait_for(lambda i: len(i) == 1, timeout=10)

        prom = CollectorRegistry()
        prom.register(RegistryCollector(registry))
        client = _parse(generate_latest(prom).decode())
        inv = (("service", "inventory"),)
        assert client[("busreg_client_registrations", inv)] == 1
        assert client[("busreg_client_heartbeats_sent_total", inv)] >= 2
        assert client[("busreg_client_heartbeats_failed_total", inv)] == 0
        assert client[("busreg_client_watched_services", ())] == 1
        assert client[("busreg_client_view_revision", inv)] >= 3
        assert client[("busreg_client_view_instances", inv)] == 1
        assert client[("busreg_client_view_resyncs_total", inv)] >= 1
        assert client[("busreg_client_view_deltas_applied_total", inv)] >= 1

        samples = await _scrape(port)
        assert samples[("busreg_worker_owned_partitions", ())] == settings.partitions
        assert _total(samples, "busreg_partition_events_applied_total") >= 3
