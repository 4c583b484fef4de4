"""Prometheus metrics of a shard worker (see docs/metrics.md).

Nothing here runs per event. A worker's counters already live in its partition runners'
``PartitionStats``; the collector reads them when Prometheus scrapes. The only per-batch
cost is one observation of the apply batch's size and latency (two prometheus_client
``Histogram``s, fed by ``PartitionStore.observe_apply``).

Set ``BUSREG_WORKER__METRICS_PORT`` (or ``busreg worker --metrics-port 9464``) and the
worker serves ``GET /metrics`` with prometheus_client's own WSGI app and threaded server.
Just before each scrape it reads, at most once a second and on the worker's event loop,
what only Redis and the stream know: the watermark age, the exact outbox depth and the lag
behind the stream head. Client metrics are in ``busreg.client.metrics``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from busreg.errors import BusregError, ConfigurationError
from busreg.server.stats import COUNTERS, HOPS, PartitionStats, WorkerStatus
from busreg.server.store import PartitionStore
from busreg.settings import Settings
from busreg.tasks import close_quietly
from busreg.transport.connections import stream_consumer, translate
from busreg.transport.streams import peek_heads

__all__ = ["MetricsSource", "WorkerCollector", "WorkerMetrics"]

log = logging.getLogger("busreg.metrics")

#: Upper bounds of the apply batch size histogram (events per Lua call; batch_max ≤ 10,000).
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
#: Upper bounds of the apply latency histogram (seconds per Lua call).
APPLY_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Scrape-time reads of Redis and the streams happen at most this often.
PROBE_MIN_INTERVAL = 1.0
#: Budget of one scrape-time probe (all owned partitions).
PROBE_TIMEOUT = 2.0
#: What a scrape waits for the event loop beyond the probe's own budget.
COLLECT_SLACK = 3.0


class MetricsSource(Protocol):
    """What the collector reads of a worker (``busreg.server.worker.Worker``)."""

    worker_id: str
    settings: Settings
    store: PartitionStore | None

    @property
    def snapshot_requests(self) -> int: ...

    def status(self) -> WorkerStatus: ...

    def retired_stats(self) -> dict[int, PartitionStats]: ...


@dataclass
class _Probe:
    """What Redis and the stream said about one owned partition at the last probe."""

    outbox: int | None = None
    watermark_age: float | None = None
    head: int | None = None


@dataclass
class _ProbeState:
    partitions: dict[int, _Probe] = field(default_factory=dict)
    last: float = 0.0
    failures: int = 0


class WorkerCollector(Collector):
    """Metrics of one live Worker, read at scrape time.

    ``collect`` runs in prometheus_client's HTTP thread and hands the work to the worker's
    event loop: ``refresh`` adds what Redis and the stream know (at most once a second),
    then the families are built from the worker's memory there."""

    def __init__(self, worker: MetricsSource) -> None:
        self._worker = worker
        self._probe = _ProbeState()
        self._consumer: Any = None
        self._lock = asyncio.Lock()
        #: the worker's loop, set by ``bind`` (the scrape runs in prometheus_client's thread)
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # --- scrape-time probe (event loop) -------------------------------------------------------

    async def refresh(self) -> None:
        """Read watermark age, outbox depth and stream heads of the owned partitions."""
        async with self._lock:
            if time.monotonic() - self._probe.last < PROBE_MIN_INTERVAL:
                return
            self._probe.last = time.monotonic()
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await self._read()
            except (BusregError, TimeoutError, OSError) as exc:
                # a probe is best effort: the scrape goes on with what memory knows
                self._probe.failures += 1
                log.debug("metrics probe failed: %r", exc)
                await self._drop_consumer()

    async def _read(self) -> None:
        store = self._worker.store
        if store is None:
            return
        owned = sorted(self._worker.status().owned)
        fresh: dict[int, _Probe] = {}
        with translate("metrics: Redis time"):
            seconds, micros = await store.redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        for k in owned:
            state = await store.partition_state(k)
            probe = fresh[k] = _Probe(outbox=int(state.get("outbox", 0)))
            last_ts = state.get("last_ts")
            if last_ts:
                probe.watermark_age = max(0.0, (now_ms - float(last_ts)) / 1000)
        self._probe.partitions = fresh  # partitions given up meanwhile are dropped at once
        if self._consumer is None:
            self._consumer = await stream_consumer(
                self._worker.settings, f"busreg-metrics-{self._worker.worker_id}"
            )
        heads = await peek_heads(self._consumer, self._worker.settings, owned)
        for k, head in heads.items():
            fresh[k].head = head if head >= 0 else None

    async def _drop_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await close_quietly(consumer.close, "metrics consumer", timeout=2)

    async def aclose(self) -> None:
        await self._drop_consumer()

    # --- collect (reads memory only) ---------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        """Called by prometheus_client's HTTP thread: the probe and the reads of the
        worker's state run on the worker's event loop, never in this thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return []
        future = asyncio.run_coroutine_threadsafe(self._collect_on_loop(), loop)
        try:
            return future.result(timeout=PROBE_TIMEOUT + COLLECT_SLACK)
        except concurrent.futures.TimeoutError:
            future.cancel()
            log.warning("metrics scrape: the worker's event loop did not answer in time")
            return []

    async def _collect_on_loop(self) -> list[Metric]:
        await self.refresh()
        return list(self._families())

    def _families(self) -> Iterable[Metric]:
        worker = self._worker
        status = worker.status()
        owned = status.owned
        totals = _totals(worker.retired_stats(), owned)
        info = GaugeMetricFamily(
            "busreg_worker_info",
            "This worker: its id, namespace and partition count (value 1).",
            labels=["worker_id", "namespace", "partitions"],
        )
        info.add_metric(
            [worker.worker_id, worker.settings.namespace, str(worker.settings.partitions)], 1
        )
        yield info
        yield GaugeMetricFamily(
            "busreg_worker_owned_partitions",
            "Partitions this worker owns now (holds the lease of).",
            value=len(owned),
        )
        yield GaugeMetricFamily(
            "busreg_worker_live_workers",
            "Live workers of the namespace as this worker last saw them (itself included).",
            value=len(status.live_workers),
        )
        yield CounterMetricFamily(
            "busreg_worker_snapshot_requests",
            "Snapshot and service-list requests this worker answered.",
            value=worker.snapshot_requests,
        )
        for attr, suffix, doc in COUNTERS:
            family = CounterMetricFamily(
                f"busreg_partition_{suffix}",
                doc + " Counted by this worker process, per partition.",
                labels=["partition"],
            )
            for k, stats in sorted(totals.items()):
                family.add_metric([str(k)], getattr(stats, attr))
            yield family
        dead = CounterMetricFamily(
            "busreg_partition_events_dead_lettered",
            "Events refused and copied to the dead-letter exchange, by reason.",
            labels=["partition", "reason"],
        )
        for k, stats in sorted(totals.items()):
            for reason, n in sorted(stats.dead_by_reason.items()):
                dead.add_metric([str(k), reason], n)
        yield dead
        hops = CounterMetricFamily(
            "busreg_partition_delta_hop_seconds",
            "Seconds the batches with deltas spent in each hop inside the worker "
            "(deliver, queue, apply, handoff, confirm; see docs/metrics.md). Divide by "
            "busreg_partition_delta_batches_total for the mean.",
            labels=["partition", "hop"],
        )
        batches = CounterMetricFamily(
            "busreg_partition_delta_batches",
            "Applied batches that produced deltas (published and confirmed).",
            labels=["partition"],
        )
        for k, stats in sorted(totals.items()):
            for hop, _ in HOPS:
                hops.add_metric([str(k), hop], stats.hop_seconds.get(hop, 0.0))
            batches.add_metric([str(k)], stats.delta_batches)
        yield hops
        yield batches
        yield from self._owned_gauges(owned)

    def _owned_gauges(self, owned: dict[int, PartitionStats]) -> Iterable[Metric]:
        offset = GaugeMetricFamily(
            "busreg_partition_committed_offset",
            "Stream offset committed with the partition's state (owned partitions).",
            labels=["partition"],
        )
        outbox = GaugeMetricFamily(
            "busreg_partition_outbox_depth",
            "Deltas committed but not yet published and confirmed (owned partitions).",
            labels=["partition"],
        )
        lag = GaugeMetricFamily(
            "busreg_partition_lag_events",
            "Stream messages after the committed offset (head - committed; owned partitions).",
            labels=["partition"],
        )
        age = GaugeMetricFamily(
            "busreg_partition_watermark_age_seconds",
            "Redis time minus the broker timestamp of the newest applied message (owned "
            "partitions); expiry is measured against this watermark.",
            labels=["partition"],
        )
        probes = self._probe.partitions
        for k, stats in sorted(owned.items()):
            label = [str(k)]
            offset.add_metric(label, stats.offset)
            probe = probes.get(k)
            outbox.add_metric(
                label, probe.outbox if probe and probe.outbox is not None else stats.outbox
            )
            if probe is None:
                continue
            if probe.head is not None:
                lag.add_metric(label, max(0, probe.head - stats.offset))
            if probe.watermark_age is not None:
                age.add_metric(label, probe.watermark_age)
        yield offset
        yield outbox
        yield lag
        yield age
        yield CounterMetricFamily(
            "busreg_worker_probe_failures",
            "Scrape-time reads of Redis/stream state that failed (lag, watermark age missing).",
            value=self._probe.failures,
        )


def _totals(
    retired: dict[int, PartitionStats], owned: dict[int, PartitionStats]
) -> dict[int, PartitionStats]:
    """Per-partition counters over this process's life: finished runners + current ones."""
    out: dict[int, PartitionStats] = {}
    for source in (retired, owned):
        for k, stats in source.items():
            out.setdefault(k, PartitionStats()).add(stats)
    return out


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


class WorkerMetrics:
    """A worker's registry (its collector, the apply histograms, process/platform/GC) and
    the HTTP endpoint serving it. ``start()`` binds (a busy port fails there, before any
    work), ``close()`` stops the server thread and frees the port."""

    def __init__(self, worker: MetricsSource) -> None:
        cfg = worker.settings.worker
        if cfg.metrics_port is None:
            raise ConfigurationError("worker.metrics_port is not set")
        self.host = cfg.metrics_host
        self.port = cfg.metrics_port
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = WorkerCollector(worker)
        self.registry.register(self.collector)
        self._batch_sizes = Histogram(
            "busreg_apply_batch_size",
            "Events per atomic apply call (stream messages incl. ticks and dead letters).",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self._apply_seconds = Histogram(
            "busreg_apply_duration_seconds",
            "Latency of one atomic apply call (the Lua script round trip to Redis).",
            buckets=APPLY_SECONDS_BUCKETS,
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_apply(self, events: int, seconds: float) -> None:
        """One committed apply batch (``PartitionStore.observe_apply``)."""
        self._batch_sizes.observe(events)
        self._apply_seconds.observe(seconds)

    def _app(self) -> Callable[..., Iterable[bytes]]:
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            # prometheus_client answers every path with the metrics; a typo in a scrape
            # config should get a 404, not a page that looks right
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return metrics(environ, start_response)  # type: ignore[no-any-return]
            if path == "/":
                start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
                return [b"busreg worker: see /metrics\n"]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found; see /metrics\n"]

        return app

    async def start(self) -> None:
        self.collector.bind(asyncio.get_running_loop())
        try:
            server = make_server(
                self.host, self.port, self._app(), ThreadingWSGIServer, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        self._server = server
        self.port = server.server_port  # the real one when port 0 was asked for
        self._thread = threading.Thread(
            target=server.serve_forever, name="busreg-metrics", daemon=True
        )
        self._thread.start()

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # shutdown() waits for serve_forever to notice; keep the loop free meanwhile,
            # since a scrape in flight may be waiting on it
            await asyncio.to_thread(server.shutdown)
            server.server_close()
        await self.collector.aclose()
