"""Redis Sentinel: the master is SIGKILLed under load and a replica takes over (issue 12).

Two worker processes use ``redis+sentinel://`` (brokers/redis-sentinel.sh: master, replica,
three Sentinels); 100 instances over 10 services heartbeat; each service has a watcher and
a consumer group. The master holding every partition is SIGKILLed; Sentinel promotes the
replica (~2 s). Replication is asynchronous, so acknowledged writes may be lost: every
partition must move to a new epoch (apply.lua compares the primary's master_replid), and
no (service, epoch, revision) may ever be delivered with two different contents.

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
from pathlib import Path

import pytest

from busreg import Registry, Settings
from busreg.ops.admin import applied_namespace
from busreg.settings import ClientSettings, WorkerSettings

from .helpers import spawn_worker, stop_process
from .workload import (
    Fleet,
    Observers,
    Tally,
    arun_script,
    brokers_script,
    delete_groups,
    register,
    run_script,
)

pytestmark = [pytest.mark.servers, pytest.mark.soak, pytest.mark.timeout(300)]

SCRIPT = Path(__file__).resolve().parents[2] / "brokers" / "redis-sentinel.sh"
SERVICES = [f"ha{n}" for n in range(10)]
PER_SERVICE = 10


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[dict[str, str]]:
    with brokers_script(SCRIPT, tmp_path) as env:
        yield env


async def test_sentinel_master_loss_under_load(
    busreg_settings: Settings, sentinel: dict[str, str], tmp_path: Path
) -> None:
    base = busreg_settings.model_copy(
        update={
            "redis_url": run_script(SCRIPT, sentinel, "url", "0"),
            "worker": WorkerSettings(lease_ttl=1.5, drain_timeout=5.0),
            "client": ClientSettings(heartbeat_interval=1.0, ttl=3.0, request_timeout=10.0),
        }
    )
    fleet, tally = Fleet(), Tally()
    async with applied_namespace(base) as settings:
        workers = {w: spawn_worker(settings, w, tmp_path / f"{w}.log") for w in ("s-a", "s-b")}
        try:
            async with (
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

                killed_port = await arun_script(SCRIPT, sentinel, "kill-master")
                killed = time.monotonic()
                # registrations go to the broker, not Redis: they are confirmed at once,
                # and visible once the workers write to the promoted replica
                await register(fleet, apps, SERVICES[0], "after-kill")
                await views[SERVICES[0]].wait_for(lambda i: "after-kill" in i, timeout=60)
                healed = time.monotonic() - killed
                # the old master comes back (empty) and rejoins as a replica
                await arun_script(SCRIPT, sentinel, "restart", killed_port)

                # every partition moved to a new epoch, and every view followed it
                for service in SERVICES:
                    await views[service].wait_for(
                        lambda _i, s=service: views[s].epoch != before[s], timeout=30
                    )
                await obs.settled(timeout=30)
                snapshots, gaps = await obs.final_check(timeout=20)
                for service, snap in snapshots.items():
                    assert snap.epoch != before[service], f"{service}: no new epoch"
                resynced = sum(views[s].resyncs - resyncs[s] for s in SERVICES)

            print(
                f"\nsentinel failover: new registration visible {healed:.2f} s after the"
                f" master was killed; watcher resyncs {resynced} over {len(SERVICES)} views;"
                f" revisions checked {len(tally.revisions)}; conflicting contents"
                f" {len(tally.conflicts)}; gaps {gaps}; false expiries"
                f" {len(tally.false_expiries)}; missing live {len(tally.missing_live)}"
            )
            obs.assert_clean(gaps)
        finally:
            for proc in workers.values():
                stop_process(proc, signal.SIGTERM)
            await delete_groups(settings, SERVICES, "ha")
