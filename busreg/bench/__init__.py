"""``busreg bench``: busreg's speed and scale, measured beside the raw broker and Redis.

    busreg bench [--quick] [--json] [--scenarios a,b,...] [--plot DIR] [--profile DIR]
    python -m busreg.bench ...        (same, settings from BUSREG_* only)

Runs against the configured RabbitMQ (AMQP + stream protocol) and Redis. Each scenario uses
its own namespace, removed afterwards; workers run as ``python -m busreg worker``
subprocesses, killed on exit. Sections (see docs/benchmarks.md):

1. baselines: raw stream publish/consume, Redis pipeline and Lua, the 3-hop floor latency;
2. heartbeat ingestion with 1 and 2 workers (and backlog drain);
3. register / deregister → watcher latency; 4. crash detection; 5. worker takeover;
6. footprint; 7. growth from 1k to 100k instances.

Baselines always run: every figure is reported beside (as a ratio to) the raw rate measured
in the same run, because the machine is shared and absolute numbers are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import sys
import time
from typing import Any

from busreg.settings import Settings

__all__ = ["EXTRA_SCENARIOS", "SCENARIOS", "main"]

SCENARIOS = (
    "baselines",
    "ingestion",
    "batched",
    "drain",
    "latency",
    "crash",
    "takeover",
    "idle",
    "peer",
)
#: run only when asked for (they need a second broker): ``--scenarios replication``
EXTRA_SCENARIOS = ("replication",)
#: sections computed from another scenario's run
ALIASES = {"footprint": "ingestion", "growth": "ingestion"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="busreg bench",
        description="Measure busreg beside the raw broker and Redis (see docs/benchmarks.md).",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, under a minute (CI)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS + tuple(ALIASES))} "
        f"(baselines always run), or {','.join(EXTRA_SCENARIOS)}",
    )
    p.add_argument("--plot", metavar="DIR", help="write PNG plots there (needs matplotlib)")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy the worker during the largest ingestion step (needs py-spy)",
    )
    p.add_argument(
        "--replicated-amqp-url",
        metavar="URLS",
        help="the nodes of a replicated RabbitMQ cluster, comma-separated (for the "
        "replication scenario: the same figures there beside the configured broker)",
    )
    p.add_argument(
        "--replicated-stream-url",
        metavar="URLS",
        help="its stream listeners (default: each AMQP host on 5552)",
    )
    p.add_argument("--save", metavar="FILE", help="also write the results as JSON there")
    p.add_argument("--samples", metavar="FILE", help="also write raw latency samples (JSON)")
    return p


def _machine(settings: Settings) -> dict[str, Any]:
    from importlib import metadata

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    versions = {}
    for pkg in ("busreg", "rstream", "aio-pika", "redis", "pydantic", "orjson"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_mib": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "load_average_at_start": os.getloadavg(),
    }


async def _server_versions(settings: Settings, machine: dict[str, Any]) -> None:
    from busreg.transport.connections import connect_amqp, connect_redis

    redis = await connect_redis(settings)
    try:
        machine["redis"] = (await redis.info("server")).get("redis_version")
    finally:
        await redis.aclose()
    conn = await connect_amqp(settings, "busreg-bench-version")
    try:
        transport = conn.transport
        props = transport.connection.server_properties if transport else {}
        machine["rabbitmq"] = str(props.get("version", "?"))
        machine["erlang"] = str(props.get("platform", "?"))
    finally:
        await conn.close()


async def run_bench(
    settings: Settings, selected: set[str], args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    from busreg.bench.baselines import run_baselines
    from busreg.bench.common import BenchConfig, bench_namespace, progress
    from busreg.bench.ingestion import run_drain, run_ingestion
    from busreg.bench.latency import run_latency
    from busreg.bench.procs import Processes
    from busreg.bench.takeover import run_takeover
    from busreg.bench.targets import derive

    cfg = BenchConfig.quick_config() if args.quick else BenchConfig.full_config()
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "config": {**cfg.__dict__, "scenarios": sorted(selected)},
        "settings": {
            "ttl_s": settings.client.ttl,
            "heartbeat_interval_s": settings.client.heartbeat_interval,
            "lease_ttl_s": settings.worker.lease_ttl,
            "tick_interval_s": settings.worker.tick_interval,
            "batch_max": settings.worker.batch_max,
        },
    }
    samples: dict[str, list[float]] = {}
    machine = _machine(settings)
    results["machine"] = machine
    await _server_versions(settings, machine)
    procs = Processes()
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        progress("baselines")
        async with bench_namespace(settings, "base", cfg.partitions) as ns:
            base, floor_samples = await run_baselines(ns, procs, cfg)
        results["baselines"] = base
        samples.update(floor_samples)
        raw_consume = base.get("stream_consume_per_s")
        if "ingestion" in selected:
            progress(f"ingestion at {', '.join(f'{n:,}' for n in cfg.sizes)} instances")
            results["ingestion"] = await run_ingestion(settings, procs, cfg, args.profile)
        if "batched" in selected:
            from busreg.bench.batched import run_agents, run_batched

            progress("batched leases")
            results["batched"] = await run_batched(settings, procs, cfg)
            progress("instances behind agents")
            results["agents"] = await run_agents(settings, procs, cfg)
        if "drain" in selected:
            progress("backlog drain")
            results["drain"] = await run_drain(settings, procs, cfg, raw_consume)
        if "latency" in selected or "crash" in selected:
            progress("register/deregister -> watcher, crash detection")
            lat, lat_samples = await run_latency(
                settings,
                procs,
                cfg,
                base.get("floor"),
                crash="crash" in selected,
                probes="latency" in selected,
            )
            results["latency"] = lat
            samples.update(lat_samples)
        if "idle" in selected:
            from busreg.bench.idle import run_idle

            progress("idle namespace")
            results["idle"] = await run_idle(settings, procs, cfg)
        if "peer" in selected:
            from busreg.bench.peer import run_peer

            progress("peer workload (the etcd/ZooKeeper comparison's)")
            results["peer"] = await run_peer(settings, procs, cfg)
        if "takeover" in selected:
            progress("worker takeover")
            results["takeover"] = await run_takeover(settings, procs, cfg)
        if "replication" in selected:
            from busreg.bench.replication import run_replication

            replicated = settings.model_copy(
                update={
                    "amqp_url": args.replicated_amqp_url,
                    "stream_url": args.replicated_stream_url,
                    "stream_replicas": None,  # min(3, nodes), as topology apply would
                }
            )
            results["replication"] = await run_replication(settings, replicated, procs, cfg)
    finally:
        results["subprocess_crashes"] = procs.crashes()
        procs.close()
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGTERM)
    results["elapsed_s"] = time.perf_counter() - t0
    derive(results)
    progress("done")
    return results, samples


def main(argv: list[str], settings: Settings) -> int:
    args = _parser().parse_args(argv)
    selected: set[str] = set()
    for name in (s.strip() for s in args.scenarios.split(",") if s.strip()):
        if name in ALIASES:
            selected.add(ALIASES[name])
        elif name in SCENARIOS + EXTRA_SCENARIOS:
            selected.add(name)
        else:
            _parser().error(f"unknown scenario {name!r}")
    if "replication" in selected and not args.replicated_amqp_url:
        _parser().error("the replication scenario needs --replicated-amqp-url")
    try:
        results, samples = asyncio.run(run_bench(settings, selected, args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("busreg bench: interrupted", file=sys.stderr)
        return 130
    from busreg.bench.report import render
    from busreg.bench.targets import sanity_problems

    if args.json:
        print(json.dumps(results, indent=1, default=str))
    else:
        print(render(results))
    if args.save:
        with open(args.save, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if args.samples:
        with open(args.samples, "w") as f:
            json.dump(samples, f)
    if args.plot:
        from busreg.bench.plot import write_plots

        for path in write_plots(results, samples, args.plot):
            print(f"busreg bench: wrote {path}", file=sys.stderr)
    problems = sanity_problems(results)
    for problem in problems:
        print(f"busreg bench: FAILED sanity check: {problem}", file=sys.stderr)
    return 1 if problems else 0
