"""A host that loses its worker and an instance at the same moment: the instance must be
announced removed within TTL + lease TTL + 1 s of its last heartbeat, not after the 10 s
outage grace that the ownerless gap in the partition's stream used to open.

Each round kills the worker that was started in the round before, right after it has
joined: a worker ticks every partition once before it joins (standby ticks are ready when
it may be the only worker left), which the round-3 kill used to catch out (11.4 s).

Guards invariant 4 both ways: a takeover is not an outage (no delayed expiry), and no
instance expires before its TTL.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from busreg import DeltaKind, Registry, Settings
from busreg.wire.routing import partition_for

from .helpers import eventually, owners, spawn_worker, stop_process

pytestmark = [pytest.mark.servers, pytest.mark.busreg(partitions=4)]

ROUNDS = 5  # x 2 partitions of the killed worker = 10 runs


def _services(partitions: int) -> dict[int, str]:
    """One service name per partition."""
    out: dict[int, str] = {}
    n = 0
    while len(out) < partitions:
        name = f"quiet{n}"
        out.setdefault(partition_for(name, partitions), name)
        n += 1
    return out


def _balanced(o: dict[int, str | None], workers: set[str]) -> bool:
    held = [w for w in o.values() if w is not None]
    return len(held) == len(o) and {w for w in held} == workers and all(
        held.count(w) == len(o) // len(workers) for w in workers
    )


async def test_sigkilled_owner_and_instance_expire_within_ttl_plus_lease(
    busreg_namespace: Settings, tmp_path: Path
) -> None:
    settings = busreg_namespace
    ttl = settings.client.ttl
    bound = ttl + settings.worker.lease_ttl + 1.0
    beat = settings.client.heartbeat_interval
    services = _services(settings.partitions)
    procs = {w: spawn_worker(settings, w, tmp_path / f"{w}.log") for w in ("a0", "b0")}
    delays: list[float] = []
    try:
        async with Registry(settings) as registry:
            views = {k: await registry.watch(s, resync_interval=None) for k, s in services.items()}
            changes = {k: v.changes() for k, v in views.items()}
            for r in range(ROUNDS):
                live = set(procs)
                held = await eventually(
                    lambda: owners(settings),
                    lambda o, live=live: _balanced(o, live),  # type: ignore[misc]
                    timeout=30,
                    what=f"round {r}: balanced over {sorted(live)}",
                )
                victim = sorted(live)[r % 2]
                parts = sorted(k for k, w in held.items() if w == victim)
                regs = {
                    k: await registry.register(
                        services[k], address=f"127.0.0.1:{7000 + k}", instance_id=f"r{r}-{k}"
                    )
                    for k in parts
                }
                ids = {k: f"r{r}-{k}" for k in parts}
                for k in parts:
                    await views[k].wait_for(lambda i, iid=ids[k]: iid in i, timeout=10)
                stop_process(procs.pop(victim), signal.SIGKILL)
                died = time.time()
                for reg in regs.values():
                    reg.abandon()  # the instance's process dies with the host: no deregister
                for k in parts:
                    async with asyncio.timeout(20):
                        async for change in changes[k]:
                            if change.instance_id == ids[k] and change.kind is DeltaKind.REMOVED:
                                assert change.reason == "expired"
                                delays.append(time.time() - died)
                                break
                new = f"{victim[0]}{r + 1}"
                procs[new] = spawn_worker(settings, new, tmp_path / f"{new}.log")
    finally:
        for proc in procs.values():
            stop_process(proc, signal.SIGTERM)
    print(f"owner+instance SIGKILL -> removed after: {[round(d, 3) for d in delays]}s")
    assert len(delays) == 2 * ROUNDS
    # the last heartbeat was at most one interval before the kill
    assert all(d + beat <= bound for d in delays), (delays, bound)
    # and none before its TTL could have run out
    assert all(d >= ttl - beat - 0.05 for d in delays), delays
