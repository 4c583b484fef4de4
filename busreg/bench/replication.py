"""What replication costs: the same figures on one RabbitMQ node and on a replicated cluster.

``busreg bench --scenarios replication --replicated-amqp-url URLS [--replicated-stream-url
URLS]`` runs, against each of the two brokers in turn (Redis stays the configured one):

* the raw stream publish and consume rates, on a stream replicated as busreg's ingest
  partitions are (``x-initial-cluster-size``: one copy on the single node, min(3, nodes)
  on the cluster), and the bare 3-hop floor latency;
* busreg's heartbeat ingestion at a load both keep up with on this kind of machine (10,000
  instances, 3,000 with ``--quick``; one worker), with the CPU each component spends per
  heartbeat: the figures a capacity plan multiplies (docs/operations.md);
* register -> watcher latency (no crash probes).

and reports each cluster figure as a ratio to the single node's, beside the raw rates'
ratio: how much of busreg's cost of replication is the broker's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from busreg.bench.baselines import floor_latency, stream_rates
from busreg.bench.common import BenchConfig, bench_namespace, progress
from busreg.bench.ingestion import run_ingestion
from busreg.bench.latency import run_latency
from busreg.bench.procs import Processes
from busreg.settings import Settings

__all__ = ["run_replication"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


async def _one(
    label: str, settings: Settings, procs: Processes, cfg: BenchConfig
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "nodes": len(settings.amqp_urls()),
        "stream_replicas": settings.stream_replica_count(),
    }
    progress(f"replication: raw rates on the {label} broker")
    async with bench_namespace(settings, f"repl-{label[:4]}", cfg.partitions) as ns:
        out.update(await stream_rates(ns, cfg.raw_messages))
        floor, _ = await floor_latency(ns, procs, cfg)
    out["floor_ms"] = floor["latency_ms"]
    progress(f"replication: ingestion on the {label} broker")
    ingestion = await run_ingestion(settings, procs, cfg, None)
    step = ingestion["steps"][-1]
    window = step["one_worker"]
    out["ingestion"] = {
        "instances": step["instances"],
        "registered": step["registered"],
        "confirmed_per_s": window["confirmed_per_s"],
        "applied_per_s": window["applied_per_s"],
        "apply_lag_ms": window["apply_lag_ms"],
        "server_us_per_heartbeat": window["server_us_per_heartbeat"],
        "broker_us_per_heartbeat": window.get("broker_us_per_heartbeat"),
        "worker_us_per_heartbeat": window.get("worker_us_per_heartbeat"),
        "redis_us_per_heartbeat": window.get("redis_us_per_heartbeat"),
    }
    progress(f"replication: register -> watcher on the {label} broker")
    latency, _ = await run_latency(settings, procs, cfg, floor, crash=False, probes=True)
    out["register_view_ms"] = latency["register"]["view"]
    return out


async def run_replication(
    single: Settings, replicated: Settings, procs: Processes, cfg: BenchConfig
) -> dict[str, Any]:
    """Both brokers, one after the other, with the same sizes."""
    size = 3_000 if cfg.quick else 10_000
    small = dataclasses.replace(cfg, sizes=(size,), two_worker_sizes=())
    one = await _one("single", single, procs, small)
    many = await _one("replicated", replicated, procs, small)
    ratios = {
        "raw_stream_publish": _ratio(many["stream_publish_per_s"], one["stream_publish_per_s"]),
        "raw_stream_consume": _ratio(many["stream_consume_per_s"], one["stream_consume_per_s"]),
        "floor_p50": _ratio(many["floor_ms"].get("p50"), one["floor_ms"].get("p50")),
        "ingestion_applied": _ratio(
            many["ingestion"]["applied_per_s"], one["ingestion"]["applied_per_s"]
        ),
        **{
            f"{part}_us_per_heartbeat": _ratio(
                many["ingestion"][f"{part}_us_per_heartbeat"],
                one["ingestion"][f"{part}_us_per_heartbeat"],
            )
            for part in ("broker", "worker", "redis")
        },
        "register_view_p50": _ratio(
            many["register_view_ms"].get("p50"), one["register_view_ms"].get("p50")
        ),
        "register_view_p99": _ratio(
            many["register_view_ms"].get("p99"), one["register_view_ms"].get("p99")
        ),
    }
    return {"single": one, "replicated": many, "ratios": ratios}
