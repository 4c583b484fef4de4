"""Worker takeover after SIGKILL and SIGTERM, with exactly-once checked afterwards.

A worker subprocess owns the partitions; a second one (the standby) is started and, as
busreg assigns partitions over live workers, takes half of them. Then the first one gets
SIGKILL or SIGTERM and the time from the signal until the standby owns *every* partition
is measured by polling the lease keys (``PartitionStore.owner``'s keys, every 2 ms). The
standby becomes the active worker of the next run. A light heartbeat load runs all along;
at the end every heartbeat the broker confirmed must have been applied exactly once
(``applied`` == confirmed heartbeats, ``stale`` == 0; redeliveries show up as
``replayed``, skipped by the committed offset).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from busreg.bench.common import (
    BenchConfig,
    bench_namespace,
    lease_owners,
    partition_states,
    percentiles,
    progress,
    redis_client,
    wait_until,
)
from busreg.bench.ingestion import _wid, wait_owned
from busreg.bench.loadgen import HeartbeatLoad
from busreg.bench.procs import Processes
from busreg.transport.connections import stream_producer
from busreg.transport.streams import stream_heads

__all__ = ["run_takeover"]

log = logging.getLogger("busreg.bench")


async def run_takeover(base: Any, procs: Processes, cfg: BenchConfig) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    out: dict[str, Any] = {"runs": runs}
    async with bench_namespace(base, "takeover", cfg.partitions) as settings:
        redis = await redis_client(settings)
        producer = await stream_producer(settings, "busreg-bench-takeover")
        active_id = _wid("a")
        active = procs.spawn_worker(settings, active_id)
        load = HeartbeatLoad(
            settings,
            services=max(8, cfg.services // 4),
            ttl=settings.client.ttl,
            interval=settings.client.heartbeat_interval,
        )
        load.resize(cfg.takeover_instances)
        try:
            await wait_owned(redis, settings, {active_id}, 20)
            async with load.running(producer):
                await asyncio.sleep(1.0)
                kinds = [signal.SIGKILL, signal.SIGTERM] * cfg.takeover_runs
                for n, sig in enumerate(kinds):
                    standby_id = _wid(f"s{n}")
                    standby = procs.spawn_worker(settings, standby_id)
                    await wait_owned(redis, settings, {active_id, standby_id}, 20)
                    await asyncio.sleep(0.3)  # settled: both own their half
                    t0 = time.perf_counter()
                    active.signalled = True
                    active.popen.send_signal(sig)
                    taken = freed = None
                    owners: list[str | None] = []
                    deadline = t0 + 15
                    while time.perf_counter() < deadline:
                        owners = await lease_owners(redis, settings)
                        now = time.perf_counter() - t0
                        if freed is None and active_id not in owners:
                            freed = now
                        if all(o == standby_id for o in owners):
                            taken = now
                            break
                        await asyncio.sleep(0.002)
                    await procs.stop(active, signal.SIGKILL, timeout=10)
                    runs.append(
                        {
                            "signal": signal.Signals(sig).name,
                            "takeover_s": taken,
                            # the old owner's last lease gone (released or expired)
                            "freed_s": freed,
                            "standby_owned_at_end": sum(1 for o in owners if o == standby_id),
                        }
                    )
                    progress(f"takeover after {signal.Signals(sig).name}: {taken} s")
                    active, active_id = standby, standby_id
                await asyncio.sleep(0.5)
            # load stopped: every confirmed heartbeat must end up applied exactly once
            await load.wait_confirmed(10)
            heads = await stream_heads(settings)

            async def caught_up() -> bool:
                states = await partition_states(redis, settings)
                return all(st["offset"] >= heads[k] for k, st in enumerate(states))

            await wait_until(caught_up, 20, 0.05, "takeover namespace caught up")
            states = await partition_states(redis, settings)
            applied = int(sum(st["applied"] for st in states))
            out["exactly_once"] = {
                "heartbeats_confirmed": load.confirmed,
                "heartbeats_failed": load.failed,
                "applied": applied,
                "stale": int(sum(st["stale"] for st in states)),
                "replayed_skipped": int(sum(st["replayed"] for st in states)),
                "ok": applied == load.confirmed and sum(st["stale"] for st in states) == 0,
            }
        finally:
            await procs.stop(active, signal.SIGKILL)
            await producer.close()
            await redis.aclose()
    for name in ("SIGKILL", "SIGTERM"):
        times = [r["takeover_s"] for r in runs if r["signal"] == name and r["takeover_s"]]
        out[name] = percentiles(times)
        freed_times = [r["freed_s"] for r in runs if r["signal"] == name and r["freed_s"]]
        out[name]["freed_median_s"] = percentiles(freed_times).get("p50")
        out[name]["failed"] = sum(1 for r in runs if r["signal"] == name and not r["takeover_s"])
    return out
