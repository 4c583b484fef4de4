"""Heartbeat ingestion, footprint and growth; backlog drain.

Ingestion: one namespace, one worker subprocess, simulated instances growing step by step
(e.g. 1k → 10k → 100k), each sending one heartbeat per second. At each step, once every
instance is registered and the outbox is empty, a steady window measures the applied rate
(``applied`` counters of the partitions' state hashes), the apply lag (age of the newest
committed event: Redis ``last_ts`` against the clock, sampled every 100 ms), CPU of worker,
broker, Redis and load generator, the worker's RSS, Redis bytes per instance and broker
bytes per heartbeat. At the steps in ``two_worker_sizes`` a second worker subprocess joins
(it takes half the partitions) and the window is repeated.

Backlog drain: N heartbeats of registered instances are published while no worker runs;
then a worker (or two, started together) is started and the time until every partition's
committed offset reaches the stream head is measured.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from typing import Any

import redis.asyncio as aioredis

from busreg import constants as c
from busreg.bench.common import (
    BenchConfig,
    bench_namespace,
    glob_escape,
    instance_count,
    lease_owners,
    partition_states,
    percentiles,
    progress,
    ratio,
    redis_client,
    seed_live_workers,
    wait_until,
)
from busreg.bench.loadgen import HeartbeatLoad, check_template
from busreg.bench.procs import CpuMeter, Processes, proc_rss_kib, server_pids, stream_dir_bytes
from busreg.server.store import PartitionStore
from busreg.settings import Settings
from busreg.transport.connections import stream_producer
from busreg.transport.streams import stream_heads

__all__ = ["run_drain", "run_ingestion"]

log = logging.getLogger("busreg.bench")


def _wid(name: str) -> str:
    return f"bench-{name}-{os.urandom(3).hex()}"


async def wait_owned(
    redis: aioredis.Redis, settings: Settings, owners: set[str], timeout: float
) -> bool:
    """Every partition owned, by exactly the workers in ``owners`` (each owning some)."""

    async def check() -> bool:
        now = await lease_owners(redis, settings)
        return None not in now and set(now) == owners

    return await wait_until(check, timeout, 0.02, f"partitions owned by {sorted(owners)}")


async def measure_window(
    redis: aioredis.Redis,
    settings: Settings,
    load: HeartbeatLoad,
    worker_pids: list[int],
    seconds: float,
) -> dict[str, Any]:
    """Steady-state figures over ``seconds`` of paced load."""
    cpu = CpuMeter(worker_pids, server_pids(settings))
    s0 = await partition_states(redis, settings)
    disk0 = stream_dir_bytes(settings.namespace)
    sent0, conf0 = load.sent, load.confirmed
    cpu.start()
    t0 = time.perf_counter()
    lags: list[float] = []
    while time.perf_counter() - t0 < seconds:
        await asyncio.sleep(0.1)
        states = await partition_states(redis, settings)
        now_ms = time.time() * 1000
        lags += [now_ms - st["last_ts"] for st in states if st["last_ts"] > 0]
    s1 = await partition_states(redis, settings)
    used = cpu.stop()
    disk1 = stream_dir_bytes(settings.namespace)
    wall = used["wall"]
    applied = sum(b["applied"] - a["applied"] for a, b in zip(s0, s1, strict=True))
    committed = sum(b["offset"] - a["offset"] for a, b in zip(s0, s1, strict=True))
    sent, confirmed = load.sent - sent0, load.confirmed - conf0
    per_hb = {
        f"{k}_us_per_heartbeat": (used[k] / applied * 1e6 if applied else None)
        for k in ("worker", "broker", "redis")
    }
    server = used["worker"] + used["broker"] + used["redis"]
    out: dict[str, Any] = {
        "workers": len(worker_pids),
        "seconds": wall,
        "offered_per_s": load.active / load.interval,
        "sent_per_s": sent / wall,
        "confirmed_per_s": confirmed / wall,
        "applied_per_s": applied / wall,
        "committed_per_s": committed / wall,
        "backlog_growth_per_s": (confirmed - applied) / wall,
        "apply_lag_ms": percentiles(lags),
        "cpu_seconds": {k: v for k, v in used.items() if k != "wall"},
        "cpu_cores": {k: v / wall for k, v in used.items() if k != "wall"},
        **per_hb,
        "server_us_per_heartbeat": server / applied * 1e6 if applied else None,
        "loadgen_us_per_heartbeat": used["loadgen"] / sent * 1e6 if sent else None,
        "broker_disk_bytes_per_heartbeat": (
            (disk1 - disk0) / confirmed
            if disk0 is not None and disk1 is not None and confirmed
            else None
        ),
        "worker_rss_kib": [proc_rss_kib(p).get("VmRSS") for p in worker_pids],
    }
    return out


async def redis_footprint(redis: aioredis.Redis, settings: Settings) -> dict[str, Any]:
    """MEMORY USAGE (SAMPLES 0: exact) of every key of the namespace's partitions."""
    by_kind: dict[str, int] = {}
    keys = 0
    for k in range(settings.partitions):
        prefix = c.partition_key_prefix(settings.namespace, k)
        async for key in redis.scan_iter(match=glob_escape(prefix + "*"), count=1000):
            name = key.decode() if isinstance(key, bytes) else str(key)
            kind = name[len(prefix) :]
            kind = "s:<service>" if kind.startswith("s:") else kind
            size = await redis.memory_usage(key, samples=0)
            by_kind[kind] = by_kind.get(kind, 0) + int(size or 0)
            keys += 1
    # the outbox is transient (deltas not yet published): not part of what an instance costs
    steady = sum(v for k, v in by_kind.items() if k != "outbox")
    return {
        "bytes": steady,
        "outbox_bytes": by_kind.get("outbox", 0),
        "keys": keys,
        "by_kind": by_kind,
    }


async def used_memory(redis: aioredis.Redis) -> int:
    info = await redis.info("memory")
    return int(info["used_memory"])


async def _registered(
    store: PartitionStore, redis: aioredis.Redis, settings: Settings, n: int
) -> bool:
    if await instance_count(store, settings.partitions) < n:
        return False
    states = await partition_states(redis, settings)
    return all(st["outbox"] == 0 for st in states)


async def run_ingestion(
    base: Settings, procs: Processes, cfg: BenchConfig, profile_dir: str | None
) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    out: dict[str, Any] = {"partitions": cfg.partitions, "services": cfg.services, "steps": steps}
    async with bench_namespace(base, "ingest", cfg.partitions) as settings:
        redis = await redis_client(settings)
        store = PartitionStore(redis, settings.namespace)
        producer = await stream_producer(settings, "busreg-bench-load")
        w1_id = _wid("w1")
        w1 = procs.spawn_worker(settings, w1_id)
        try:
            await wait_owned(redis, settings, {w1_id}, 20)
            mem0 = await used_memory(redis)
            out["server_pids"] = server_pids(settings)
            idle = CpuMeter([w1.pid], out["server_pids"])
            idle.start()
            await asyncio.sleep(0.5 if cfg.quick else 3.0)
            used = idle.stop()
            out["idle_cpu_cores"] = {k: v / used["wall"] for k, v in used.items() if k != "wall"}
            load = HeartbeatLoad(
                settings,
                services=cfg.services,
                ttl=settings.client.ttl,
                interval=settings.client.heartbeat_interval,
            )
            # the template must encode exactly what encode_event(Heartbeat(...)) does
            out["heartbeat_bytes"] = check_template(cfg.services, settings.client.ttl)
            async with load.running(producer):
                for size in cfg.sizes:
                    progress(f"ingestion: {size:,} instances")
                    load.resize(size)
                    t0 = time.perf_counter()
                    ok = await wait_until(
                        functools.partial(_registered, store, redis, settings, size),
                        cfg.register_timeout,
                        0.2,
                        f"{size} instances registered",
                    )
                    step: dict[str, Any] = {
                        "instances": size,
                        "registered": ok,
                        "time_to_register_s": time.perf_counter() - t0,
                    }
                    await asyncio.sleep(0.3 if cfg.quick else 1.0)
                    step["one_worker"] = await measure_window(
                        redis, settings, load, [w1.pid], cfg.window
                    )
                    fp = await redis_footprint(redis, settings)
                    count = await instance_count(store, settings.partitions)
                    step["instances_in_redis"] = count
                    step["redis_bytes"] = fp
                    step["redis_bytes_per_instance"] = fp["bytes"] / count if count else None
                    step["redis_used_memory_delta_per_instance"] = (
                        (await used_memory(redis) - mem0) / count if count else None
                    )
                    step["worker_rss_kib"] = proc_rss_kib(w1.pid)
                    step["worker_alive"] = w1.alive()
                    if profile_dir is not None and size == cfg.sizes[-1]:
                        step["profile"] = await profile_worker(
                            w1.pid, profile_dir, min(cfg.window, 8.0)
                        )
                    if size in cfg.two_worker_sizes:
                        step["two_workers"] = await _two_workers(
                            procs, redis, settings, load, cfg, w1_id, w1.pid
                        )
                    steps.append(step)
        finally:
            await procs.stop(w1, signal.SIGKILL)
            await producer.close()
            await redis.aclose()
    return out


async def _two_workers(
    procs: Processes,
    redis: aioredis.Redis,
    settings: Settings,
    load: HeartbeatLoad,
    cfg: BenchConfig,
    w1_id: str,
    w1_pid: int,
) -> dict[str, Any]:
    w2_id = _wid("w2")
    w2 = procs.spawn_worker(settings, w2_id)
    try:
        await wait_owned(redis, settings, {w1_id, w2_id}, 20)

        async def caught_up() -> bool:
            now_ms = time.time() * 1000
            states = await partition_states(redis, settings)
            return all(now_ms - st["last_ts"] < 500 for st in states)

        await wait_until(caught_up, 5.0 if cfg.quick else 15.0, 0.1, "two workers caught up")
        result = await measure_window(redis, settings, load, [w1_pid, w2.pid], cfg.window)
    finally:
        await procs.stop(w2, signal.SIGTERM)
    await wait_owned(redis, settings, {w1_id}, 10)
    return result


async def profile_worker(pid: int, directory: str, seconds: float) -> dict[str, Any]:
    """py-spy (if installed) on a worker for ``seconds``: top frames by own and total time."""
    import shutil

    exe = shutil.which("py-spy")
    if exe is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"worker-{pid}.collapsed")
    proc = await asyncio.create_subprocess_exec(
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        "200",
        "--format",
        "raw",
        "--output",
        path,
        "--nonblocking",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0 or not await asyncio.to_thread(os.path.exists, path):
        return {"error": f"py-spy failed: {err.decode(errors='replace')[-300:]}"}
    return summarize_collapsed(path)


def summarize_collapsed(path: str, top: int = 15) -> dict[str, Any]:
    """Top functions of a py-spy ``raw`` (collapsed) profile, by own and by total samples
    (line numbers dropped; the event loop's own frames left out of the total)."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    with open(path) as f:
        for line in f:
            stack, _, count_s = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_s)
            samples += count
            frames = [_function(frame) for frame in stack.split(";")]
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for frame in set(frames):
                if not frame.startswith(_LOOP_FRAMES):
                    total[frame] = total.get(frame, 0) + count

    def table(d: dict[str, int]) -> list[list[Any]]:
        rows = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [[name, round(100 * n / max(1, samples), 1)] for name, n in rows]

    return {"file": path, "samples": samples, "own_pct": table(own), "total_pct": table(total)}


_LOOP_FRAMES = (
    "<module>", "Runner.", "BaseEventLoop.", "main (", "_run_code", "_run_module", "run (r",
    "Handle._run", "_until_signal", "_cmd_worker",
)  # fmt: skip


def _function(frame: str) -> str:
    """``name (path/file.py:123)`` -> ``name (file.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({where.rsplit('/', 1)[-1]})" if where else name


# --- backlog drain -------------------------------------------------------------------------------


async def _drain_once(
    procs: Processes,
    redis: aioredis.Redis,
    store: PartitionStore,
    settings: Settings,
    load: HeartbeatLoad,
    producer: Any,
    events: int,
    workers: int,
) -> dict[str, Any]:
    rounds = max(1, events // load.active)
    publish_s = await load.send_rounds(producer, rounds)
    count = rounds * load.active
    heads = await stream_heads(settings)
    start = await partition_states(redis, settings)
    applied0 = sum(st["applied"] for st in start)
    ids = [_wid(f"d{i}") for i in range(workers)]
    if workers > 1:
        await seed_live_workers(store, ids, 5_000)
    t_spawn = time.perf_counter()
    started = [procs.spawn_worker(settings, wid) for wid in ids]
    t_first = None
    t_done = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = await partition_states(redis, settings)
        now = time.perf_counter()
        if t_first is None and any(
            b["offset"] > a["offset"] for a, b in zip(start, states, strict=True)
        ):
            t_first = now
        if all(st["offset"] >= heads[k] for k, st in enumerate(states)):
            t_done = now
            break
        await asyncio.sleep(0.01)
    applied = sum(st["applied"] for st in await partition_states(redis, settings)) - applied0
    for proc in started:
        await procs.stop(proc, signal.SIGTERM)
    if t_done is None or t_first is None:
        return {"workers": workers, "events": count, "error": "backlog not drained in 120 s"}
    return {
        "workers": workers,
        "events": count,
        "applied": int(applied),
        "publish_per_s": count / publish_s,
        "startup_s": t_first - t_spawn,
        "drain_s": t_done - t_first,
        "drain_per_s": count / (t_done - t_first),
        "drain_incl_startup_per_s": count / (t_done - t_spawn),
    }


async def run_drain(
    base: Settings, procs: Processes, cfg: BenchConfig, raw_consume: float | None
) -> dict[str, Any]:
    out: dict[str, Any] = {"instances": cfg.drain_instances}
    async with bench_namespace(base, "drain", cfg.partitions) as settings:
        redis = await redis_client(settings)
        store = PartitionStore(redis, settings.namespace)
        producer = await stream_producer(settings, "busreg-bench-drain")
        try:
            load = HeartbeatLoad(settings, services=cfg.services, ttl=30.0)
            load.resize(cfg.drain_instances)
            # register every instance first, so the backlog is heartbeats of known instances
            wid = _wid("reg")
            w = procs.spawn_worker(settings, wid)
            await load.send_rounds(producer, 1)
            await wait_until(
                functools.partial(_registered, store, redis, settings, cfg.drain_instances),
                cfg.register_timeout,
                0.1,
                "drain instances registered",
            )
            await procs.stop(w, signal.SIGTERM)
            for workers in (1, 2):
                progress(f"backlog drain: {workers} worker(s)")
                r = await _drain_once(
                    procs, redis, store, settings, load, producer, cfg.drain_events, workers
                )
                r["drain_to_raw_consume_ratio"] = ratio(r.get("drain_per_s"), raw_consume)
                out["one_worker" if workers == 1 else "two_workers"] = r
        finally:
            await producer.close()
            await redis.aclose()
    one, two = out.get("one_worker", {}), out.get("two_workers", {})
    out["two_to_one_worker_ratio"] = ratio(two.get("drain_per_s"), one.get("drain_per_s"))
    return out
