"""Batched leases: how many instance-heartbeats a second one worker sustains when they come
as batched heartbeat events (contract v2), as a Registry holding many registrations or an
agent sends them, beside the same load as one message per heartbeat.

One namespace, one worker subprocess; the load generator simulates ``n`` instances over
``services`` services, one heartbeat each per second, packed ``per_message`` to a message
per partition. "Sustained" is the ingestion scenario's rule: everything offered is applied
and the p99 apply lag stays under 250 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import time
from typing import Any

from busreg.bench.common import (
    BenchConfig,
    bench_namespace,
    partition_states,
    progress,
    redis_client,
    wait_until,
)
from busreg.bench.ingestion import _registered, _wid, measure_window, wait_owned
from busreg.bench.loadgen import HeartbeatLoad, service_name
from busreg.bench.procs import CpuMeter, Processes, server_pids
from busreg.client.registry import Registry
from busreg.server.store import PartitionStore
from busreg.settings import Settings
from busreg.transport.connections import stream_producer

__all__ = [
    "PER_MESSAGE",
    "open_fleet",
    "register_fleet",
    "run_agents",
    "run_batched",
    "server_cost",
]

#: Heartbeats per message: a process with a hundred registrations per partition (an agent
#: on a big host, the Eureka gateway) sends batches of about this size.
PER_MESSAGE = 100


def sustained(window: dict[str, Any]) -> bool:
    lag = window["apply_lag_ms"].get("p99")
    return (
        window["applied_per_s"] >= 0.97 * window["offered_per_s"] and lag is not None and lag < 250
    )


async def run_batched(base: Settings, procs: Processes, cfg: BenchConfig) -> dict[str, Any]:
    sizes = (10_000, 20_000) if cfg.quick else (48_000, 64_000, 100_000)
    steps: list[dict[str, Any]] = []
    out: dict[str, Any] = {"per_message": PER_MESSAGE, "services": cfg.services, "steps": steps}
    async with bench_namespace(base, "batched", cfg.partitions) as settings:
        redis = await redis_client(settings)
        store = PartitionStore(redis, settings.namespace)
        producer = await stream_producer(settings, "busreg-bench-batched")
        wid = _wid("b1")
        worker = procs.spawn_worker(settings, wid)
        try:
            await wait_owned(redis, settings, {wid}, 20)
            load = HeartbeatLoad(
                settings,
                services=cfg.services,
                ttl=settings.client.ttl,
                interval=settings.client.heartbeat_interval,
                per_message=PER_MESSAGE,
            )
            async with load.running(producer):
                for size in sizes:
                    progress(f"batched leases: {size:,} instances, {PER_MESSAGE} per message")
                    load.resize(size)
                    t0 = time.perf_counter()
                    ok = await wait_until(
                        functools.partial(_registered, store, redis, settings, size),
                        cfg.register_timeout,
                        0.2,
                        f"{size} batched instances registered",
                    )
                    await asyncio.sleep(0.3 if cfg.quick else 1.0)  # settle, then measure
                    window = await measure_window(redis, settings, load, [worker.pid], cfg.window)
                    window["keeps_up"] = sustained(window)
                    window["messages_per_s"] = window["sent_per_s"] / PER_MESSAGE
                    steps.append(
                        {
                            "instances": size,
                            "registered": ok,
                            "time_to_register_s": time.perf_counter() - t0,
                            "window": window,
                        }
                    )
        finally:
            await procs.stop(worker, signal.SIGKILL)
            await producer.close()
            await redis.aclose()
    kept = [s for s in steps if s["window"]["keeps_up"]]
    out["sustained_per_s"] = max((s["window"]["applied_per_s"] for s in kept), default=None)
    return out


#: The agent figure of issue 17: 1,000 instances behind 10 agents, 1 s heartbeats.
AGENTS = 10
PER_AGENT = 100


async def run_agents(base: Settings, procs: Processes, cfg: BenchConfig) -> dict[str, Any]:
    """Server CPU per instance-heartbeat when instances renew through agents.

    Each "agent" here is a ``Registry`` holding ``PER_AGENT`` registrations, as
    ``busreg agent`` does (the agent adds only its Unix socket in front, which costs the
    servers nothing); each has its own connections and beat phase, as separate hosts."""
    agents = 3 if cfg.quick else AGENTS
    n = agents * PER_AGENT
    out: dict[str, Any] = {"agents": agents, "instances": n, "services": cfg.services}
    async with bench_namespace(base, "agents", cfg.partitions) as settings:
        redis = await redis_client(settings)
        store = PartitionStore(redis, settings.namespace)
        wid = _wid("a1")
        worker = procs.spawn_worker(settings, wid)
        try:
            await wait_owned(redis, settings, {wid}, 20)
            async with contextlib.AsyncExitStack() as stack:
                registries = await open_fleet(stack, settings, agents, "bench-agent")
                services = [service_name(j) for j in range(cfg.services)]
                await register_fleet(registries, n, services, "agent")
                await wait_until(
                    functools.partial(_registered, store, redis, settings, n),
                    cfg.register_timeout,
                    0.2,
                    "agent instances registered",
                )
                await asyncio.sleep(2.0)  # every registration past its first heartbeat
                cost = await server_cost(redis, settings, worker.pid, cfg.window)
                out["batches_total"] = sum(_batches(r) for r in registries)
        finally:
            await procs.stop(worker, signal.SIGKILL)
            await redis.aclose()
    out["agents_us_per_heartbeat"] = cost.pop("client_us_per_heartbeat")
    out.update(cost)
    return out


async def open_fleet(
    stack: contextlib.AsyncExitStack, settings: Settings, count: int, name: str
) -> list[Registry]:
    """``count`` registries, each a fleet process of its own (connections, beat phase)."""
    return [
        await stack.enter_async_context(Registry(settings, name=f"{name}-{k}"))
        for k in range(count)
    ]


async def register_fleet(
    fleet: list[Registry],
    n: int,
    services: list[str],
    prefix: str,
    metadata: dict[str, str] | None = None,
) -> None:
    """Instances ``0..n-1`` over ``services``, dealt round-robin to the fleet."""
    for i in range(n):
        await fleet[i % len(fleet)].register(
            services[i % len(services)],
            address=f"10.{8 + i // 65536}.{(i >> 8) & 255}.{i & 255}:8080",
            instance_id=f"{prefix}-{i:04d}",
            metadata=metadata,
        )


async def server_cost(
    redis: Any, settings: Settings, worker_pid: int, seconds: float
) -> dict[str, Any]:
    """Heartbeats applied over a quiet window of ``seconds`` and what they cost: server CPU
    (worker + broker + Redis) per heartbeat and in % of a core, and this process's (the
    clients') CPU per heartbeat."""
    meter = CpuMeter([worker_pid], server_pids(settings))
    s0 = await partition_states(redis, settings)
    meter.start()
    await asyncio.sleep(seconds)  # a measurement window
    used = meter.stop()
    s1 = await partition_states(redis, settings)
    applied = sum(b["applied"] - a["applied"] for a, b in zip(s0, s1, strict=True))

    def per(cpu: float) -> float | None:
        return cpu / applied * 1e6 if applied else None

    server = used["worker"] + used["broker"] + used["redis"]
    out: dict[str, Any] = {"applied_per_s": applied / used["wall"]}
    for k in ("worker", "broker", "redis"):
        out[f"{k}_us_per_heartbeat"] = per(used[k])
    out["server_us_per_heartbeat"] = per(server)
    out["server_cpu_percent"] = server / used["wall"] * 100
    out["client_us_per_heartbeat"] = per(used["loadgen"])
    return out


def _batches(registry: Registry) -> int:
    publisher = registry._publisher
    return 0 if publisher is None or publisher.batcher is None else publisher.batcher.batches
