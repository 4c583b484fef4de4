"""The peer workload: the issue's side-by-side table (etcd 3.4, ZooKeeper 3.8, busreg) ran
one driver for all three systems: 1,000 instances over 50 services, 1 s heartbeat, 3 s TTL,
200-byte payload, registrations at 100/s while the rest heartbeat, one subscriber watching
all 50 services; busreg with one worker and one ``Registry`` per fleet process.

Here the fleet is ``FLEET`` registries in this process (each a fleet process: its own
connections and beat phase, its registrations' heartbeats batched), the subscriber one more
registry watching every service, and the probes a last one registering new instances at
100/s. Figures: write confirmed (``register()`` returned) → subscriber notified, p50/p99,
and the server CPU per instance-heartbeat over a quiet window (no probes) at 1,000/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import time
from typing import Any

from busreg.bench.batched import _batches, open_fleet, register_fleet, server_cost
from busreg.bench.common import (
    BenchConfig,
    bench_namespace,
    percentiles,
    redis_client,
    wait_until,
)
from busreg.bench.ingestion import _registered, _wid, wait_owned
from busreg.bench.procs import Processes
from busreg.client.registry import Registry
from busreg.server.store import PartitionStore
from busreg.settings import Settings

__all__ = ["run_peer"]

INSTANCES = 1_000
SERVICES = 50
FLEET = 10
#: probes registered at this rate, as the peers' driver did
PROBE_RATE = 100.0
PAYLOAD = "x" * 120  # with the rest of the registration, about the driver's 200 bytes


async def run_peer(base: Settings, procs: Processes, cfg: BenchConfig) -> dict[str, Any]:
    n = 300 if cfg.quick else INSTANCES
    probes = 50 if cfg.quick else 300
    out: dict[str, Any] = {"instances": n, "services": SERVICES, "fleet": FLEET}
    async with bench_namespace(base, "peer", cfg.partitions) as settings:
        redis = await redis_client(settings)
        store = PartitionStore(redis, settings.namespace)
        wid = _wid("p1")
        worker = procs.spawn_worker(settings, wid)
        try:
            await wait_owned(redis, settings, {wid}, 20)
            async with contextlib.AsyncExitStack() as stack:
                fleet = await open_fleet(stack, settings, FLEET, "bench-fleet")
                subscriber = await stack.enter_async_context(
                    Registry(settings, name="bench-subscriber")
                )
                prober = await stack.enter_async_context(Registry(settings, name="bench-prober"))
                services = [f"peer-{j:02d}" for j in range(SERVICES)]
                await register_fleet(fleet, n, services, "fleet", {"payload": PAYLOAD})
                await wait_until(
                    functools.partial(_registered, store, redis, settings, n),
                    cfg.register_timeout,
                    0.2,
                    "peer fleet registered",
                )
                seen: dict[str, float] = {}
                views = [await subscriber.watch(s, resync_interval=None) for s in services]
                followers = [asyncio.create_task(_follow(v, seen)) for v in views]
                try:
                    await asyncio.sleep(2.0)  # past every registration's first heartbeat
                    cost = await server_cost(redis, settings, worker.pid, cfg.window)
                    cost.pop("client_us_per_heartbeat")
                    out["heartbeats_per_s"] = cost.pop("applied_per_s")
                    out.update(cost)
                    out["batches_total"] = sum(_batches(r) for r in fleet)
                    out.update(await _probes(prober, services, seen, probes))
                finally:
                    for task in followers:
                        task.cancel()
                    await asyncio.gather(*followers, return_exceptions=True)
        finally:
            await procs.stop(worker, signal.SIGKILL)
            await redis.aclose()
    return out


async def _follow(view: Any, seen: dict[str, float]) -> None:
    async for change in view.changes():
        seen.setdefault(change.instance_id, time.perf_counter())


async def _probes(
    prober: Registry, services: list[str], seen: dict[str, float], count: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    confirmed: dict[str, float] = {}
    started: dict[str, float] = {}
    next_at = loop.time()
    for i in range(count):
        next_at += 1 / PROBE_RATE
        delay = next_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the probes, not synchronisation
        iid = f"probe-{i:04d}"
        started[iid] = time.perf_counter()
        await prober.register(
            services[i % len(services)],
            address=f"10.9.{i >> 8}.{i & 255}:8080",
            instance_id=iid,
            metadata={"payload": PAYLOAD},
        )
        confirmed[iid] = time.perf_counter()

    async def all_seen() -> bool:
        return all(iid in seen for iid in confirmed)

    await wait_until(all_seen, 10.0, 0.02, "peer probes seen")
    after_confirm = [seen[i] - t for i, t in confirmed.items() if i in seen]
    after_call = [seen[i] - t for i, t in started.items() if i in seen]
    return {
        "probes": count,
        "missing": sum(1 for i in confirmed if i not in seen),
        "confirmed_to_notified_ms": percentiles(after_confirm, 1000.0),
        "call_to_notified_ms": percentiles(after_call, 1000.0),
    }
