"""Prometheus metrics of shard workers and registry clients (see docs/metrics.md).

Nothing here runs per event. A worker's counters already live in its partition runners'
``PartitionStats``; the collectors read them when Prometheus scrapes. The only per-batch
cost is one observation of the apply batch's size and latency (``ApplyTimedStore``).

Workers: set ``BUSREG_WORKER__METRICS_PORT`` (or ``busreg worker --metrics-port 9464``) and
the worker serves ``GET /metrics`` from its own event loop (no thread). Just before each
scrape it reads, at most once a second, what only Redis and the stream know: the
watermark age, the exact outbox depth and the lag behind the stream head.

Clients: expose a Registry's metrics through the host application's own registry::

    from prometheus_client import REGISTRY
    from busreg.server.metrics import RegistryCollector

    REGISTRY.register(RegistryCollector(registry))
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

import redis.asyncio as aioredis
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from busreg import constants as c
from busreg.errors import BusregError, ConfigurationError
from busreg.server.runner import PartitionStats
from busreg.server.store import ApplyResult, Lease, PartitionStore
from busreg.transport.connections import stream_consumer, translate, translate_stream

if TYPE_CHECKING:
    from busreg.client.registry import Registry
    from busreg.server.worker import Worker

__all__ = [
    "ApplyTimedStore",
    "Buckets",
    "MetricsServer",
    "RegistryCollector",
    "WorkerCollector",
    "worker_metrics_server",
    "worker_registry",
]

log = logging.getLogger("busreg.metrics")

#: Upper bounds of the apply batch size histogram (events per Lua call; batch_max ≤ 10,000).
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
#: Upper bounds of the apply latency histogram (seconds per Lua call).
APPLY_SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
#: Scrape-time reads of Redis and the streams happen at most this often.
PROBE_MIN_INTERVAL = 1.0
#: Budget of one scrape-time probe (all owned partitions).
PROBE_TIMEOUT = 2.0
#: How long a head peek waits for the last chunk of a partition stream.
PEEK_TIMEOUT = 0.25
#: Counters of PartitionStats (name, metric suffix, help).
_COUNTERS = (
    (
        "applied",
        "events_applied",
        "Events that changed or renewed state (register, heartbeat, "
        "deregister newer than what was known).",
    ),
    ("stale", "events_stale", "Events older than what was already applied (ignored)."),
    (
        "replayed",
        "events_replayed",
        "Events at or below the committed offset, read again after "
        "a takeover or reconnect (skipped).",
    ),
    (
        "expired",
        "instances_expired",
        "Instances expired (no heartbeat within their TTL, measured against the watermark).",
    ),
    ("published", "deltas_published", "Deltas published to service exchanges and confirmed."),
    ("batches", "apply_batches", "Atomic apply calls (one Lua script per batch)."),
)


class Buckets:
    """A histogram accumulated in place: ``observe`` is a bisect and two additions, turned
    into a Prometheus histogram only when scraped."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """``[(le, count <= le), ..., ("+Inf", total)]`` as Prometheus wants them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((_le(bound), float(running)))
        out.append(("+Inf", float(running + self.counts[-1])))
        return out


def _le(bound: float) -> str:
    return str(int(bound)) if bound.is_integer() else repr(bound)


class ApplyTimedStore(PartitionStore):
    """A PartitionStore that records each committed batch's size and Redis latency."""

    def __init__(self, redis: aioredis.Redis, namespace: str) -> None:
        super().__init__(redis, namespace)
        self.batch_sizes = Buckets(BATCH_SIZE_BUCKETS)
        self.apply_seconds = Buckets(APPLY_SECONDS_BUCKETS)

    async def apply(
        self,
        lease: Lease,
        args: list[Any],
        count: int,
        max_step_ms: int,
        tombstone_ms: int,
        grace_ms: int,
    ) -> ApplyResult:
        started = time.perf_counter()
        result = await super().apply(lease, args, count, max_step_ms, tombstone_ms, grace_ms)
        self.apply_seconds.observe(time.perf_counter() - started)
        self.batch_sizes.observe(count)
        return result


# --- worker ------------------------------------------------------------------------------------


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

    ``collect`` only reads memory; ``refresh`` (awaited by the worker's metrics server
    before each scrape) adds what Redis and the stream know, at most once a second."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._probe = _ProbeState()
        self._consumer: Any = None
        self._peek_failed = False
        self._lock = asyncio.Lock()

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
        # concurrently: an rstream unsubscribe alone takes about 0.2 s
        self._peek_failed = False
        async with asyncio.TaskGroup() as tg:
            heads = {k: tg.create_task(self._peek_head(k)) for k in owned}
        for k, task in heads.items():
            fresh[k].head = task.result()
        if self._peek_failed:  # the others' heads are kept; the consumer is replaced
            raise BusregError("stream head peek failed")

    async def _peek_head(self, k: int) -> int | None:
        """Offset of the newest message of partition ``k``'s stream (None: unknown)."""
        settings = self._worker.settings
        newest = -1
        seen = asyncio.Event()

        async def on_message(_body: bytes, ctx: Any) -> None:
            nonlocal newest
            newest = max(newest, ctx.offset)
            seen.set()

        stream = c.ingest_partition(settings.namespace, k)
        try:
            await self._peek(stream, on_message, seen)
        except BusregError as exc:  # reported by _read, after the other peeks are done
            log.debug("metrics: peek %s failed: %r", stream, exc)
            self._peek_failed = True
            return None
        return newest if newest >= 0 else None

    async def _peek(
        self,
        stream: str,
        on_message: Callable[[bytes, Any], Awaitable[None]],
        seen: asyncio.Event,
    ) -> None:
        from rstream import ConsumerOffsetSpecification, OffsetType

        with translate_stream(f"peek {stream}"):
            sid = await self._consumer.subscribe(
                stream,
                on_message,
                offset_specification=ConsumerOffsetSpecification(OffsetType.LAST, None),
            )
            try:
                with contextlib.suppress(TimeoutError):  # empty stream: no chunk comes
                    async with asyncio.timeout(PEEK_TIMEOUT):
                        await seen.wait()
                        # the last chunk arrives in one frame: let its messages land
                        await asyncio.sleep(0.005)
            finally:
                await self._consumer.unsubscribe(sid)

    async def _drop_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                async with asyncio.timeout(2):
                    await consumer.close()
            except Exception as exc:  # closing a broken consumer is best effort
                log.debug("metrics consumer close: %r", exc)

    async def aclose(self) -> None:
        await self._drop_consumer()

    # --- collect (reads memory only) ---------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
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
        for attr, suffix, doc in _COUNTERS:
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
        yield from self._histograms()
        yield from self._owned_gauges(owned)

    def _histograms(self) -> Iterable[Metric]:
        store = self._worker.store
        if not isinstance(store, ApplyTimedStore):
            return
        for name, doc, buckets in (
            (
                "busreg_apply_batch_size",
                "Events per atomic apply call (stream messages incl. ticks and dead letters).",
                store.batch_sizes,
            ),
            (
                "busreg_apply_duration_seconds",
                "Latency of one atomic apply call (the Lua script round trip to Redis).",
                store.apply_seconds,
            ),
        ):
            hist = HistogramMetricFamily(name, doc, labels=[])
            hist.add_metric([], buckets.cumulative(), buckets.sum)
            yield hist

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
            total = out.setdefault(k, PartitionStats())
            add_stats(total, stats)
    return out


def add_stats(total: PartitionStats, stats: PartitionStats) -> None:
    """Add ``stats``' counters into ``total`` (offset and outbox are not counters)."""
    for attr, _, _ in _COUNTERS:
        setattr(total, attr, getattr(total, attr) + getattr(stats, attr))
    total.dead_lettered += stats.dead_lettered
    for reason, n in list(stats.dead_by_reason.items()):
        total.dead_by_reason[reason] = total.dead_by_reason.get(reason, 0) + n


def worker_registry(worker: Worker) -> tuple[CollectorRegistry, WorkerCollector]:
    """A registry with the worker's metrics and the usual process/platform/GC ones."""
    registry = CollectorRegistry(auto_describe=False)
    collector = WorkerCollector(worker)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry, collector


def worker_metrics_server(worker: Worker) -> MetricsServer:
    """The server a worker runs when ``settings.worker.metrics_port`` is set."""
    cfg = worker.settings.worker
    if cfg.metrics_port is None:
        raise ConfigurationError("worker.metrics_port is not set")
    registry, collector = worker_registry(worker)
    return MetricsServer(
        registry,
        host=cfg.metrics_host,
        port=cfg.metrics_port,
        before_scrape=collector.refresh,
        on_close=collector.aclose,
    )


# --- HTTP ---------------------------------------------------------------------------------------


class MetricsServer:
    """``GET /metrics`` of a CollectorRegistry, served from the running event loop.

    ``start()`` binds (a busy port fails there, before any work), ``serve()`` accepts until
    cancelled (connections are handled in its own TaskGroup), ``close()`` frees the port::

        server = MetricsServer(registry, host="0.0.0.0", port=9464)
        await server.start()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(server.serve())
                ...
        finally:
            await server.close()
    """

    #: Connections handled at once; more wait in the listen backlog.
    MAX_CONNECTIONS = 8
    #: A client gets this long to send its request and read the answer.
    REQUEST_TIMEOUT = 10.0

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str = "0.0.0.0",
        port: int = 9464,
        before_scrape: Callable[[], Awaitable[None]] | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._before_scrape = before_scrape
        self._on_close = on_close
        self._sock: socket.socket | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(64)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ConfigurationError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        self._sock = sock
        self.port = sock.getsockname()[1]  # the real one when port 0 was asked for

    async def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if self._on_close is not None:
            await self._on_close()

    async def serve(self) -> None:
        """Accept and answer until cancelled."""
        if self._sock is None:
            raise ConfigurationError("MetricsServer.start() first")
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.MAX_CONNECTIONS)
        async with asyncio.TaskGroup() as tg:
            while True:
                await slots.acquire()
                try:
                    conn, _ = await loop.sock_accept(self._sock)
                except BaseException:
                    slots.release()
                    raise
                tg.create_task(self._handle(conn, slots.release), name="metrics-request")

    async def _handle(self, conn: socket.socket, done: Callable[[], None]) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.REQUEST_TIMEOUT):
                reader, writer = await asyncio.open_connection(sock=conn)
                head = await reader.readuntil(b"\r\n\r\n")
                status, ctype, body = await self._answer(head)
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                )
                if not head.startswith(b"HEAD "):
                    writer.write(body)
                await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away or sent nonsense: nothing to answer
        except Exception:  # a failed scrape must never take the worker down
            log.exception("metrics request failed")
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):  # the peer may have reset already
                    await writer.wait_closed()
            else:
                conn.close()
            done()

    async def _answer(self, head: bytes) -> tuple[str, str, bytes]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            return "400 Bad Request", "text/plain", b"bad request\n"
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET /metrics\n"
        path = target.split("?", 1)[0]
        if path == "/":
            return "200 OK", "text/plain; charset=utf-8", b"busreg worker: see /metrics\n"
        if path != "/metrics":
            return "404 Not Found", "text/plain", b"not found; see /metrics\n"
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        if self._before_scrape is not None:
            await self._before_scrape()
        encoder, ctype = choose_encoder(accept)
        return "200 OK", ctype, encoder(self.registry)


# --- client -------------------------------------------------------------------------------------


class RegistryCollector(Collector):
    """Metrics of one Registry client, for the host application's own registry::

        REGISTRY.register(RegistryCollector(registry))

    Reads the registry's in-memory counters at scrape time (safe from an exposition
    thread: it only copies lists and reads numbers)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        regs = list(self._registry.registrations)
        views = list(self._registry.views.items())
        active = GaugeMetricFamily(
            "busreg_client_registrations",
            "Instances this client registered that are still heartbeating.",
            labels=["service"],
        )
        sent = CounterMetricFamily(
            "busreg_client_heartbeats_sent",
            "Heartbeats the broker confirmed, over every registration of this client.",
            labels=["service"],
        )
        failed = CounterMetricFamily(
            "busreg_client_heartbeats_failed",
            "Heartbeats that were not confirmed in time (the next one is tried on schedule).",
            labels=["service"],
        )
        per_service: dict[str, list[int]] = {}
        for reg in regs:
            row = per_service.setdefault(reg.service, [0, 0, 0])
            row[0] += 1 if reg.active else 0
            row[1] += reg.heartbeats_sent
            row[2] += reg.heartbeats_failed
        for service, (n_active, n_sent, n_failed) in sorted(per_service.items()):
            active.add_metric([service], n_active)
            sent.add_metric([service], n_sent)
            failed.add_metric([service], n_failed)
        yield active
        yield sent
        yield failed
        yield GaugeMetricFamily(
            "busreg_client_watched_services",
            "Services this client keeps a live view of.",
            value=len(views),
        )
        revision = GaugeMetricFamily(
            "busreg_client_view_revision",
            "Revision of the service the live view is at.",
            labels=["service"],
        )
        instances = GaugeMetricFamily(
            "busreg_client_view_instances",
            "Instances in the live view (any status).",
            labels=["service"],
        )
        resyncs = CounterMetricFamily(
            "busreg_client_view_resyncs",
            "Snapshot reads of the view (start, gaps, reconnects, periodic checks).",
            labels=["service"],
        )
        deltas = CounterMetricFamily(
            "busreg_client_view_deltas_applied",
            "Deltas applied to the view in order.",
            labels=["service"],
        )
        for service, view in sorted(views):
            revision.add_metric([service], view.revision)
            instances.add_metric([service], len(view.state.instances))
            resyncs.add_metric([service], view.resyncs)
            deltas.add_metric([service], view.deltas_applied)
        yield revision
        yield instances
        yield resyncs
        yield deltas
