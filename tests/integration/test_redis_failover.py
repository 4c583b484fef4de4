"""The Redis master is SIGKILLed under load and a replica takes over (issue 12), behind
Sentinels and in a Redis Cluster.

Two worker processes use ``redis+sentinel://`` (brokers/redis-sentinel.sh: master, replica,
three Sentinels) or ``redis+cluster://`` (brokers/redis-cluster.sh: 3 masters + 3
replicas); 100 instances over 10 services heartbeat; each service has a watcher and a
consumer group. The master holding the most partitions (the only one, behind Sentinels) is
SIGKILLed and its replica promoted (~2 s). Replication is asynchronous, so acknowledged
writes may be lost: every partition that master held must move to a new epoch (apply.lua
compares the primary's master_replid), and no (service, epoch, revision) may ever be
delivered with two different contents. An auditor samples the leases all along: no
fencing token is ever held by two workers.

Afterwards: every instance is listed and every view equals a fresh snapshot, no false
expiries, no live instance dropped from a view, and the groups saw the new epoch's
revisions without gaps. Measured and printed: the time from the kill to a new
registration being visible, and the watchers' resyncs.

Guards invariants 3 (fenced writes: a worker never writes with a token the new primary
does not hold), 4 (no false expiry) and 5 (revisions: an epoch change, not a silent
re-issue, after state was lost).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from busreg import Registry, Settings, partition_for
from busreg import constants as c
from busreg.ops.admin import applied_namespace
from busreg.settings import ClientSettings, WorkerSettings

from .helpers import spawn_worker, stop_process
from .workload import (
    Fleet,
    Observers,
    OwnershipAuditor,
    Tally,
    arun_script,
    auditing,
    brokers_script,
    delete_groups,
    register,
    run_script,
)

pytestmark = [pytest.mark.servers, pytest.mark.soak, pytest.mark.timeout(300)]

BROKERS = Path(__file__).resolve().parents[2] / "brokers"
SERVICES = [f"ha{n}" for n in range(10)]
PER_SERVICE = 10


@dataclass(frozen=True)
class Setup:
    kind: str  # "sentinel" | "cluster"
    script: Path
    env: dict[str, str]
    url: str

    async def kill_busiest_master(self, settings: Settings) -> tuple[str, set[int]]:
        """SIGKILL the master holding the most partitions: (its port, those partitions)."""
        if self.kind == "sentinel":
            port = await arun_script(self.script, self.env, "kill-master")
            return port, set(range(settings.partitions))
        where: dict[str, set[int]] = {}
        for k in range(settings.partitions):
            key = c.partition_key_prefix(settings.namespace, k) + c.KEY_STATE
            addr = await arun_script(self.script, self.env, "master-of", key)
            where.setdefault(addr, set()).add(k)
        # the most partitions, counted by the services on them: every master holds some
        # partitions, and the ones it holds must carry a service for the test to see
        used = [partition_for(s, settings.partitions) for s in SERVICES]
        addr, parts = max(where.items(), key=lambda kv: (sum(p in kv[1] for p in used), len(kv[1])))
        port = addr.rsplit(":", 1)[1]
        await arun_script(self.script, self.env, "kill", port)
        return port, parts


@pytest.fixture(params=["sentinel", "cluster"])
def redis_ha(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    kind = request.param
    script = BROKERS / f"redis-{kind}.sh"
    with brokers_script(script, tmp_path) as env:
        url = run_script(script, env, "url", *(["0"] if kind == "sentinel" else []))
        yield Setup(kind, script, env, url)


async def test_redis_master_loss_under_load(
    busreg_settings: Settings, redis_ha: Setup, tmp_path: Path
) -> None:
    base = busreg_settings.model_copy(
        update={
            "redis_url": redis_ha.url,
            "worker": WorkerSettings(lease_ttl=1.5, drain_timeout=5.0),
            "client": ClientSettings(heartbeat_interval=1.0, ttl=3.0, request_timeout=10.0),
        }
    )
    fleet, tally = Fleet(), Tally()
    async with applied_namespace(base) as settings:
        workers = {w: spawn_worker(settings, w, tmp_path / f"{w}.log") for w in ("s-a", "s-b")}
        auditor = OwnershipAuditor(settings, monotonic=False, outages=True)
        try:
            async with (
                auditing(auditor),
                Registry(settings, name="ha-apps") as apps,
                Registry(settings, name="ha-observer") as observer,
                Observers(observer, SERVICES, "ha", fleet, tally) as obs,
            ):
                views = obs.views
                for service in SERVICES:
                    for n in range(PER_SERVICE):
                        await register(fleet, apps, service, f"{service}-{n}")
                await obs.settled(timeout=30)
                before = {s: views[s].epoch for s in SERVICES}
                resyncs = {s: views[s].resyncs for s in SERVICES}

                killed_port, lost = await redis_ha.kill_busiest_master(settings)
                killed = time.monotonic()
                hit = [s for s in SERVICES if partition_for(s, settings.partitions) in lost]
                # registrations go to the broker, not Redis: they are confirmed at once,
                # and visible once the workers write to the promoted replica
                await register(fleet, apps, hit[0], "after-kill")
                await views[hit[0]].wait_for(lambda i: "after-kill" in i, timeout=60)
                healed = time.monotonic() - killed
                # the old master comes back (empty) and rejoins as a replica
                await arun_script(redis_ha.script, redis_ha.env, "restart", killed_port)

                # every partition of the killed master moved to a new epoch, and every
                # view of its services followed it; the other masters' kept theirs
                for service in hit:
                    await views[service].wait_for(
                        lambda _i, s=service: views[s].epoch != before[s], timeout=30
                    )
                await obs.settled(timeout=30)
                snapshots, gaps = await obs.final_check(timeout=20)
                for service, snap in snapshots.items():
                    if service in hit:
                        assert snap.epoch != before[service], f"{service}: no new epoch"
                    else:
                        assert snap.epoch == before[service], f"{service}: epoch changed"
                resynced = sum(views[s].resyncs - resyncs[s] for s in SERVICES)

            print(
                f"\n{redis_ha.kind} failover: partitions {sorted(lost)} lost their master;"
                f" new registration visible {healed:.2f} s after the kill;"
                f" watcher resyncs {resynced} over {len(SERVICES)} views;"
                f" revisions checked {len(tally.revisions)}; conflicting contents"
                f" {len(tally.conflicts)}; gaps {gaps}; false expiries"
                f" {len(tally.false_expiries)}; missing live {len(tally.missing_live)}"
            )
            obs.assert_clean(gaps)
            assert auditor.violations == []
            assert auditor.samples > 50
        finally:
            for proc in workers.values():
                stop_process(proc, signal.SIGTERM)
            await delete_groups(settings, SERVICES, "ha")
