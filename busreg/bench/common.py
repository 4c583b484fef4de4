"""Shared plumbing of ``busreg bench``: sizes, statistics, namespaces, Redis reads.

Nothing here measures busreg; it makes the scenarios short and keeps them honest: every
scenario runs in its own namespace (``bench-<what>-<random>``), created with
``busreg.ops.admin.applied_namespace`` and removed whatever happens. Subprocesses
and /proc readings are in ``procs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from busreg import constants as c
from busreg.ops.admin import applied_namespace
from busreg.server.store import PartitionStore
from busreg.settings import Settings
from busreg.transport.connections import connect_redis

__all__ = [
    "BenchConfig",
    "bench_namespace",
    "glob_escape",
    "instance_count",
    "lease_owners",
    "partition_states",
    "percentiles",
    "progress",
    "ratio",
    "redis_client",
    "seed_live_workers",
    "wait_until",
]

log = logging.getLogger("busreg.bench")

_T0 = time.perf_counter()


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one run. ``quick()`` fits in a minute; ``full()`` in about ten."""

    quick: bool
    partitions: int
    #: growth steps (simulated instances, one heartbeat each per second)
    sizes: tuple[int, ...]
    #: steps at which a second worker is added
    two_worker_sizes: tuple[int, ...]
    services: int
    window: float
    register_timeout: float
    raw_messages: int
    redis_updates: int
    floor_seconds: float
    floor_rate: int
    latency_background: int
    latency_services: int
    latency_probes: int
    latency_spacing: float
    crash_victims: int
    takeover_runs: int
    takeover_instances: int
    drain_instances: int
    drain_events: int

    @classmethod
    def quick_config(cls) -> BenchConfig:
        return cls(
            quick=True,
            partitions=4,
            sizes=(1_000, 3_000),
            two_worker_sizes=(3_000,),
            services=20,
            window=1.5,
            register_timeout=10.0,
            raw_messages=30_000,
            redis_updates=20_000,
            floor_seconds=1.5,
            floor_rate=500,
            latency_background=500,
            latency_services=25,
            latency_probes=30,
            latency_spacing=0.02,
            crash_victims=10,
            takeover_runs=1,
            takeover_instances=200,
            drain_instances=1_000,
            drain_events=20_000,
        )

    @classmethod
    def full_config(cls) -> BenchConfig:
        return cls(
            quick=False,
            partitions=8,
            # 32,000/s is the heartbeat target itself (one heartbeat per instance per second)
            sizes=(1_000, 10_000, 32_000, 100_000),
            two_worker_sizes=(32_000, 100_000),
            services=100,
            window=10.0,
            register_timeout=60.0,
            raw_messages=300_000,
            redis_updates=200_000,
            floor_seconds=10.0,
            floor_rate=500,
            latency_background=1_000,
            latency_services=50,
            latency_probes=250,
            latency_spacing=0.02,
            crash_victims=50,
            takeover_runs=5,
            takeover_instances=400,
            drain_instances=10_000,
            drain_events=200_000,
        )


def progress(message: str) -> None:
    """One progress line on stderr (stdout is reserved for the report / JSON)."""
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# --- statistics ------------------------------------------------------------------------------


def percentiles(values: Iterable[float], scale: float = 1.0) -> dict[str, float | int]:
    """count, min, p50, p90, p99, max and mean (nearest rank), each multiplied by ``scale``."""
    data = sorted(values)
    n = len(data)
    if n == 0:
        return {"count": 0}

    def rank(q: float) -> float:
        return data[min(n - 1, max(0, round(q * n + 0.5) - 1))] * scale

    return {
        "count": n,
        "min": data[0] * scale,
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": data[-1] * scale,
        "mean": sum(data) / n * scale,
    }


def ratio(a: float | int | None, b: float | int | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


async def wait_until(
    predicate: Any, timeout: float, interval: float = 0.05, what: str = "condition"
) -> bool:
    """Poll ``await predicate()`` until true; False (and a log line) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return True
        if time.monotonic() >= deadline:
            log.warning("bench: timed out after %.1fs waiting for %s", timeout, what)
            return False
        await asyncio.sleep(interval)


# --- namespaces and Redis reads ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def bench_namespace(base: Settings, what: str, partitions: int) -> AsyncIterator[Settings]:
    """A fresh namespace with its topology applied; deleted afterwards, whatever happens."""
    ns = f"bench-{what}-{uuid.uuid4().hex[:8]}"
    settings = base.model_copy(update={"namespace": ns, "partitions": partitions})
    async with applied_namespace(settings):
        yield settings


async def partition_states(redis: aioredis.Redis, settings: Settings) -> list[dict[str, float]]:
    """offset, applied, stale, replayed, expired, last_ts and outbox depth per partition,
    read in one round trip."""
    fields = ("offset", "applied", "stale", "replayed", "expired", "last_ts")
    pipe = redis.pipeline(transaction=False)
    for k in range(settings.partitions):
        prefix = c.partition_key_prefix(settings.namespace, k)
        pipe.hmget(prefix + c.KEY_STATE, list(fields))
        pipe.llen(prefix + c.KEY_OUTBOX)
    raw = await pipe.execute()
    out = []
    for k in range(settings.partitions):
        values, depth = raw[2 * k], raw[2 * k + 1]
        row = {
            name: (float(v) if v is not None else (-1.0 if name == "offset" else 0.0))
            for name, v in zip(fields, values, strict=True)
        }
        row["outbox"] = float(depth)
        out.append(row)
    return out


async def lease_owners(redis: aioredis.Redis, settings: Settings) -> list[str | None]:
    """Worker id owning each partition (None if free), one round trip; the same keys
    ``PartitionStore.owner`` reads."""
    pipe = redis.pipeline(transaction=False)
    for k in range(settings.partitions):
        pipe.get(c.partition_key_prefix(settings.namespace, k) + c.KEY_LEASE)
    values = await pipe.execute()
    out: list[str | None] = []
    for v in values:
        if v is None:
            out.append(None)
        else:
            text = v.decode() if isinstance(v, bytes) else str(v)
            out.append(text.split("|", 1)[0])
    return out


async def seed_live_workers(store: PartitionStore, worker_ids: Sequence[str], ms: int) -> None:
    """Put worker ids in the live set before they start, so that workers started together
    each acquire only their share instead of one taking all and handing half over."""
    for wid in worker_ids:
        await store.heartbeat_worker(wid, ms)


def glob_escape(pattern: str) -> str:
    """Escape Redis glob specials in a key prefix ending in ``*``."""
    body, star = pattern[:-1], pattern[-1]
    for ch in "\\[]?*":  # backslash first, or the escapes themselves get escaped
        body = body.replace(ch, "\\" + ch)
    return body + star


async def instance_count(store: PartitionStore, partitions: int) -> int:
    total = 0
    for k in range(partitions):
        total += sum(row.instances for row in await store.services(k))
    return total


async def redis_client(settings: Settings) -> aioredis.Redis:
    client = await connect_redis(settings)
    if not isinstance(client, aioredis.Redis):  # its pipelines and raw rates are per node
        await client.aclose()
        raise SystemExit("busreg bench measures a standalone Redis (or one behind Sentinels)")
    return client
