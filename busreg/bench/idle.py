"""Idle cost: what a namespace with workers and no instances burns, net of the servers' own
background.

The servers' background (broker and Redis with nothing of this namespace) is measured first
in the same run, then one worker owning every partition, then two (each ticks the other's
partitions as a standby). Figures are fractions of one core; the goal is ≤ 0.5 % in total
(broker + worker + Redis), what an idle etcd or ZooKeeper costs on this machine.
"""

from __future__ import annotations

import asyncio
from typing import Any

from busreg.bench.common import BenchConfig, bench_namespace, progress, redis_client
from busreg.bench.ingestion import _wid, wait_owned
from busreg.bench.procs import CpuMeter, Processes, server_pids
from busreg.settings import Settings

__all__ = ["run_idle"]


async def _window(meter: CpuMeter, seconds: float) -> dict[str, float]:
    meter.start()
    await asyncio.sleep(seconds)  # a measurement window, not synchronisation
    used = meter.stop()
    return {k: v / used["wall"] for k, v in used.items() if k not in ("wall", "loadgen")}


async def run_idle(base: Settings, procs: Processes, cfg: BenchConfig) -> dict[str, Any]:
    seconds = 3.0 if cfg.quick else 10.0
    out: dict[str, Any] = {"seconds": seconds, "partitions": cfg.partitions, "steps": []}
    async with bench_namespace(base, "idle", cfg.partitions) as settings:
        servers = server_pids(settings)
        progress("idle: servers' own background")
        background = await _window(CpuMeter([], servers), seconds)
        out["background"] = background
        redis = await redis_client(settings)
        workers = []
        try:
            for n in (1, 2):
                wid = _wid(f"idle{n}")
                workers.append((wid, procs.spawn_worker(settings, wid)))
                await wait_owned(redis, settings, {w for w, _ in workers}, 20)
                # let the handover and the first renewals settle before measuring
                await asyncio.sleep(2.0)
                progress(f"idle: {n} worker(s), no instances")
                used = await _window(CpuMeter([p.pid for _, p in workers], servers), seconds)
                net = {
                    "worker": used["worker"],
                    "broker": max(0.0, used["broker"] - background["broker"]),
                    "redis": max(0.0, used["redis"] - background["redis"]),
                }
                net["total"] = sum(net.values())
                out["steps"].append({"workers": n, "cores": used, "net": net})
        finally:
            for _, proc in workers:
                await procs.stop(proc)
            await redis.aclose()
    return out
