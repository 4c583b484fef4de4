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
import functools
import signal
import time
from typing import Any

from busreg.bench.common import (
    BenchConfig,
    bench_namespace,
    progress,
    redis_client,
    wait_until,
)
from busreg.bench.ingestion import _registered, _wid, measure_window, wait_owned
from busreg.bench.loadgen import HeartbeatLoad
from busreg.bench.procs import Processes
from busreg.server.store import PartitionStore
from busreg.settings import Settings
from busreg.transport.connections import stream_producer

__all__ = ["PER_MESSAGE", "run_batched"]

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
