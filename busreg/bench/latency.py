"""Register → watcher, graceful deregister → watcher, and crash detection.

One namespace, one worker subprocess and a steady background of simulated instances (one
heartbeat per second each, e.g. 1,000 over 50 services, as in the etcd/ZooKeeper comparison).
Two kinds of watcher run in this process on the first few services:

* ``view``: ``Registry.watch(service)`` and its ``changes()`` iterator, what a user sees;
* ``wire``: a bare aio-pika queue bound to the same delta exchanges (the delta's arrival,
  without the view's validation and queues), the analogue of the 3-hop floor's consumer.

Probes are ``Registry.register`` and ``Registration.deregister`` calls of a separate client
(each returns once the broker confirmed the event), one every ``latency_spacing`` seconds;
latency is from just before the call to the watcher.

Crash detection: some background instances, in watched services, stop heartbeating; each
one's last heartbeat confirm time is known (they are sent one per batch with their own
confirm callback) and the removal delta's arrival is compared with it and with the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from busreg import constants as c
from busreg.bench.common import (
    BenchConfig,
    bench_namespace,
    percentiles,
    ratio,
    redis_client,
    wait_until,
)
from busreg.bench.ingestion import _registered, _wid, wait_owned
from busreg.bench.loadgen import HeartbeatLoad
from busreg.bench.procs import Processes
from busreg.client.registration import Registration
from busreg.client.registry import Registry
from busreg.server.stats import HOPS
from busreg.server.store import PartitionStore
from busreg.transport.connections import connect_amqp, stream_producer
from busreg.transport.topology import declare_service_exchange

__all__ = ["run_latency"]

log = logging.getLogger("busreg.bench")

Seen = dict[tuple[str, str], tuple[float, str | None]]


class WireWatcher:
    """One exclusive queue bound to several services' delta exchanges."""

    def __init__(self) -> None:
        self.seen: Seen = {}
        self.deliveries = 0

    async def start(
        self, channel: aio_pika.abc.AbstractChannel, ns: str, services: list[str]
    ) -> None:
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        for service in services:
            exchange = await declare_service_exchange(channel, ns, service)
            await queue.bind(exchange, routing_key="#")
        await queue.consume(self._on_delta, no_ack=True)

    async def _on_delta(self, message: AbstractIncomingMessage) -> None:
        now = time.perf_counter()
        self.deliveries += 1
        delta = orjson.loads(message.body)
        key = (delta["kind"], delta["instance"]["instance_id"])
        self.seen.setdefault(key, (now, delta.get("reason")))


async def _follow_view(
    registry: Registry, service: str, seen: Seen, counts: dict[str, int]
) -> None:
    view = await registry.watch(service)
    async for change in view.changes():
        if change.reason == "resync":
            counts["resync_changes"] = counts.get("resync_changes", 0) + 1
            continue
        key = (change.kind.value, change.instance_id)
        seen.setdefault(key, (time.perf_counter(), change.reason))


def _latencies(sent: dict[str, float], seen: Seen, kind: str) -> tuple[list[float], int]:
    out = []
    missing = 0
    for iid, t0 in sent.items():
        hit = seen.get((kind, iid))
        if hit is None:
            missing += 1
        else:
            out.append(hit[0] - t0)
    return out, missing


async def _paced(
    calls: list[tuple[str, Callable[[], Awaitable[object]]]], spacing: float
) -> tuple[dict[str, float], list[float]]:
    """Run ``(instance id, call)`` one every ``spacing`` s; returns each call's start time
    and how long each took (register/deregister return once the broker confirmed)."""
    loop = asyncio.get_running_loop()
    sent: dict[str, float] = {}
    confirms: list[float] = []
    next_at = loop.time()
    for iid, call in calls:
        next_at += spacing
        delay = next_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        t0 = time.perf_counter()
        await call()
        confirms.append(time.perf_counter() - t0)
        sent[iid] = t0
    return sent, confirms


async def run_latency(
    base: Any,
    procs: Processes,
    cfg: BenchConfig,
    floor: dict[str, Any] | None,
    crash: bool = True,
    probes: bool = True,
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    out: dict[str, Any] = {}
    samples: dict[str, list[float]] = {}
    n_watch = max(2, cfg.latency_services // 5)
    async with bench_namespace(base, "latency", cfg.partitions) as settings:
        redis = await redis_client(settings)
        store = PartitionStore(redis, settings.namespace)
        producer = await stream_producer(settings, "busreg-bench-latency")
        conn = await connect_amqp(settings, "busreg-bench-wire")
        wid = _wid("lat")
        # its metrics give the per-hop breakdown of the probes' batches (stats.HOPS)
        port = free_port()
        worker_cfg = settings.worker.model_copy(
            update={"metrics_port": port, "metrics_host": "127.0.0.1"}
        )
        worker = procs.spawn_worker(settings.model_copy(update={"worker": worker_cfg}), wid)
        view_tasks: list[asyncio.Task[None]] = []
        try:
            await wait_owned(redis, settings, {wid}, 20)
            ttl = settings.client.ttl
            load = HeartbeatLoad(
                settings,
                services=cfg.latency_services,
                ttl=ttl,
                interval=settings.client.heartbeat_interval,
            )
            load.resize(cfg.latency_background)
            watched = [load.service_of(j) for j in range(n_watch)]
            victims = [i for i in range(load.active) if i % load.services < n_watch]
            victims = victims[: cfg.crash_victims] if crash else []
            load.tracked.update(victims)
            out["background_instances"] = load.active
            out["background_per_s"] = load.active / load.interval
            out["watched_services"] = n_watch
            async with (
                load.running(producer),
                Registry(settings, name="bench-watch") as reg,
                Registry(settings, name="bench-probes") as registrant,
            ):
                await wait_until(
                    lambda: _registered(store, redis, settings, load.active),
                    cfg.register_timeout,
                    0.1,
                    "background instances registered",
                )
                wire = WireWatcher()
                channel = await conn.channel()
                await wire.start(channel, settings.namespace, watched)
                view_seen: Seen = {}
                counts: dict[str, int] = {}
                for service in watched:
                    view_tasks.append(
                        asyncio.create_task(_follow_view(reg, service, view_seen, counts))
                    )
                await asyncio.sleep(1.0)  # views loaded, steady background
                if probes:
                    hops0 = await scrape_hops(port)
                    out.update(
                        await _register_deregister(
                            registrant,
                            cfg,
                            watched,
                            wire,
                            view_seen,
                            samples,
                        )
                    )
                    out["hops_ms"] = hop_means(hops0, await scrape_hops(port))
                    out["view_resync_changes"] = counts.get("resync_changes", 0)
                    for name in ("register", "deregister"):
                        for who in ("view", "wire"):
                            lat = out[name][who]
                            for q in ("p50", "p99"):
                                base_ms = (floor or {}).get("latency_ms", {}).get(q)
                                out[name][f"{who}_{q}_floor_ratio"] = ratio(lat.get(q), base_ms)
                    out["first_register"] = await _first_registers(
                        settings, watched, wire, 3 if cfg.quick else 10
                    )
                if crash:
                    out["crash"] = await _crash(load, victims, ttl, wire, view_seen, samples)
        finally:
            for task in view_tasks:
                task.cancel()
            for task in view_tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await procs.stop(worker, signal.SIGKILL)
            await conn.close()
            await producer.close()
            await redis.aclose()
    return out, samples


async def _register_deregister(
    registrant: Registry,
    cfg: BenchConfig,
    watched: list[str],
    wire: WireWatcher,
    view_seen: Seen,
    samples: dict[str, list[float]],
) -> dict[str, Any]:
    out: dict[str, Any] = {"probes": cfg.latency_probes, "spacing_ms": cfg.latency_spacing * 1000}
    regs: dict[str, Registration] = {}

    def register(i: int) -> Callable[[], Awaitable[object]]:
        async def call() -> None:
            iid = f"probe-{i:05d}"
            regs[iid] = await registrant.register(
                watched[i % len(watched)],
                address=f"10.200.{(i >> 8) & 255}.{i & 255}:9000",
                instance_id=iid,
                zone="zone-0",
                metadata={"version": "1.4.2", "team": "bench"},
                # long lease, no heartbeat during the probe: only the registration counts
                ttl=c.MAX_TTL,
                interval=c.MAX_HEARTBEAT_INTERVAL,
            )

        return call

    # warm-up, not measured: the first event a client sends to a partition stream pays for
    # declaring its publisher (and was seen to wait ~200 ms for the broker), once
    for j, service in enumerate(watched):
        warm = await registrant.register(
            service,
            address=f"10.201.0.{j + 1}:9000",
            instance_id=f"warmup-{j}",
            ttl=c.MAX_TTL,
            interval=c.MAX_HEARTBEAT_INTERVAL,
        )
        await warm.deregister()
    phases: list[tuple[str, str, list[tuple[str, Callable[[], Awaitable[object]]]]]] = [
        ("register", "added", [(f"probe-{i:05d}", register(i)) for i in range(cfg.latency_probes)]),
    ]
    for name, kind, calls in phases:
        sent, confirms = await _paced(calls, cfg.latency_spacing)

        async def all_seen(sent: dict[str, float] = sent, kind: str = kind) -> bool:
            return all((kind, iid) in view_seen and (kind, iid) in wire.seen for iid in sent)

        await wait_until(all_seen, 5.0, 0.02, f"{name} probes seen")
        view, view_missing = _latencies(sent, view_seen, kind)
        wire_lat, wire_missing = _latencies(sent, wire.seen, kind)
        samples[f"{name}_view"] = view
        samples[f"{name}_wire"] = wire_lat
        out[name] = {
            "view": percentiles(view, 1000.0),
            "wire": percentiles(wire_lat, 1000.0),
            "confirm": percentiles(confirms, 1000.0),
            "missing_view": view_missing,
            "missing_wire": wire_missing,
        }
        if name == "register":
            phases.append(
                ("deregister", "removed", [(iid, reg.deregister) for iid, reg in regs.items()])
            )
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def scrape_hops(port: int) -> dict[str, float]:
    """Sum of the worker's per-hop seconds and its delta batches, over all partitions."""
    from prometheus_client.parser import text_string_to_metric_families

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return resp.read().decode()  # type: ignore[no-any-return]

    text = await asyncio.to_thread(fetch)
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "busreg_partition_delta_hop_seconds_total":
                hop = sample.labels["hop"]
                out[hop] = out.get(hop, 0.0) + sample.value
            elif sample.name == "busreg_partition_delta_batches_total":
                out["batches"] = out.get("batches", 0.0) + sample.value
    return out


def hop_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean ms per hop over the batches with deltas between two scrapes."""
    n = after.get("batches", 0.0) - before.get("batches", 0.0)
    out: dict[str, float | None] = {"batches": n}
    for hop, _ in HOPS:
        spent = after.get(hop, 0.0) - before.get(hop, 0.0)
        out[hop] = spent / n * 1000 if n else None
    return out


async def _first_registers(
    settings: Any, watched: list[str], wire: WireWatcher, n: int
) -> dict[str, Any]:
    """A new process's first registration, n times: a fresh ``Registry`` (its own new
    connections), one ``register()``: from before opening it until the call returns and
    until the wire watcher has the delta. (The interpreter's own start is not counted.)"""
    opened: list[float] = []
    returned: list[float] = []
    visible: list[float] = []
    for i in range(n):
        iid = f"fresh-{i:03d}"
        t0 = time.perf_counter()
        async with Registry(settings, name=f"bench-fresh-{i}") as fresh:
            opened.append(time.perf_counter() - t0)
            reg = await fresh.register(
                watched[i % len(watched)], address=f"10.202.0.{i + 1}:9000", instance_id=iid
            )
            returned.append(time.perf_counter() - t0)
            await wait_until(
                lambda iid=iid: _seen(wire, ("added", iid)), 5.0, 0.005, "fresh registration"
            )
            hit = wire.seen.get(("added", iid))
            if hit is not None:
                visible.append(hit[0] - t0)
            await reg.deregister()
    return {
        "runs": n,
        "open_ms": percentiles(opened, 1000.0),
        "register_ms": percentiles(returned, 1000.0),
        "visible_ms": percentiles(visible, 1000.0),
    }


async def _seen(wire: WireWatcher, key: tuple[str, str]) -> bool:
    return key in wire.seen


async def _crash(
    load: HeartbeatLoad,
    victims: list[int],
    ttl: float,
    wire: WireWatcher,
    view_seen: Seen,
    samples: dict[str, list[float]],
) -> dict[str, Any]:
    """Victims stop heartbeating at once (each at its own phase of the 1 s cycle)."""
    t_stop = time.perf_counter()
    load.stopped.update(victims)
    ids = {load.instance_id(i): i for i in victims}

    async def all_expired() -> bool:
        return all(("removed", iid) in wire.seen and ("removed", iid) in view_seen for iid in ids)

    await wait_until(all_expired, ttl + 5.0, 0.05, "crashed instances expired")
    out: dict[str, Any] = {"victims": len(victims), "ttl_s": ttl}
    for who, seen in (("wire", wire.seen), ("view", view_seen)):
        after_ttl: list[float] = []
        wrong_reason = missing = 0
        for iid, i in ids.items():
            hit = seen.get(("removed", iid))
            last = load.last_confirm.get(i)
            if hit is None or last is None:
                missing += 1
                continue
            if hit[1] != "expired":
                wrong_reason += 1
            after_ttl.append(hit[0] - last - ttl)
        samples[f"crash_{who}"] = after_ttl
        out[who] = {
            "after_ttl_ms": percentiles(after_ttl, 1000.0),
            "missing": missing,
            "wrong_reason": wrong_reason,
        }
    # no false expiry: no other instance of the watched services may have been removed
    false = [
        k
        for k, v in wire.seen.items()
        if k[0] == "removed" and v[1] == "expired" and k[1] not in ids
    ]
    out["false_expiries"] = len(false)
    out["seconds_after_stop"] = time.perf_counter() - t_stop
    return out
