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

import asyncio
import os
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from busreg import Registry, Settings
from busreg import constants as c
from busreg.ops.admin import applied_namespace
from busreg.settings import ClientSettings, WorkerSettings
from busreg.transport.connections import connect_amqp

from .helpers import spawn_worker, stop_process
from .workload import Fleet, Tally, judge

pytestmark = [pytest.mark.servers, pytest.mark.soak, pytest.mark.timeout(300)]

SCRIPT = Path(__file__).resolve().parents[2] / "brokers" / "redis-sentinel.sh"
SERVICES = [f"ha{n}" for n in range(10)]
PER_SERVICE = 10


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {**os.environ, "BUSREG_BROKERS_STATE": str(tmp_path / "brokers")}
    try:
        subprocess.run(["bash", str(SCRIPT), "start"], env=env, check=True, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"brokers/redis-sentinel.sh start failed: {exc}")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, check=False, timeout=60)


def _sh(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, check=True, timeout=30, capture_output=True
    )
    return out.stdout.decode().strip()


async def test_sentinel_master_loss_under_load(
    busreg_settings: Settings, sentinel: dict[str, str], tmp_path: Path
) -> None:
    base = busreg_settings.model_copy(
        update={
            "redis_url": _sh(sentinel, "url", "0"),
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
            ):
                views = {s: await observer.watch(s, resync_interval=None) for s in SERVICES}
                ready = {s: asyncio.Event() for s in SERVICES}
                progress = asyncio.Condition()  # notified on every group delivery

                async def follow_group(service: str) -> None:
                    async with observer.consume_group(service, "ha") as messages:
                        ready[service].set()
                        async for message in messages:
                            d = message.delta
                            content = f"{d.kind}:{d.instance.model_dump_json()}"
                            tally.record(service, d.epoch, d.revision, content)
                            iid = d.instance.instance_id
                            judge(fleet, tally, f"group {service}", d.kind, iid, d.reason or "")
                            await message.ack()
                            async with progress:
                                progress.notify_all()

                async def follow_view(service: str) -> None:
                    async for ch in views[service].changes():
                        who = f"view {service}"
                        judge(fleet, tally, who, ch.kind, ch.instance_id, ch.reason or "")

                async def register(service: str, iid: str) -> None:
                    fleet.regs[iid] = await apps.register(
                        service, address=f"127.0.0.1:{20000 + len(fleet.regs)}", instance_id=iid
                    )
                    fleet.alive[iid] = (service, time.monotonic())
                    fleet.heartbeating.add(iid)

                async with asyncio.TaskGroup() as tg:
                    followers = [tg.create_task(follow_group(s)) for s in SERVICES]
                    followers += [tg.create_task(follow_view(s)) for s in SERVICES]
                    async with asyncio.timeout(10):
                        for event in ready.values():
                            await event.wait()
                    for service in SERVICES:
                        for n in range(PER_SERVICE):
                            await register(service, f"{service}-{n}")
                    for service in SERVICES:
                        want = {i for i, (s, _) in fleet.alive.items() if s == service}
                        await views[service].wait_for(lambda i, w=want: w <= set(i), timeout=30)
                    before = {s: views[s].epoch for s in SERVICES}
                    resyncs = {s: views[s].resyncs for s in SERVICES}

                    killed_port = await asyncio.to_thread(_sh, sentinel, "kill-master")
                    killed = time.monotonic()
                    # registrations go to the broker, not Redis: they are confirmed at once,
                    # and visible once the workers write to the promoted replica
                    await register(SERVICES[0], "after-kill")
                    await views[SERVICES[0]].wait_for(lambda i: "after-kill" in i, timeout=60)
                    healed = time.monotonic() - killed
                    # the old master comes back (empty) and rejoins as a replica
                    await asyncio.to_thread(_sh, sentinel, "restart", killed_port)

                    # every partition moved to a new epoch, and every view followed it
                    for service in SERVICES:
                        want = {i for i, (s, _) in fleet.alive.items() if s == service}
                        await views[service].wait_for(
                            lambda i, w=want, s=service: (
                                set(i) == w and views[s].epoch != before[s]
                            ),
                            timeout=30,
                        )
                    snapshots = {s: await observer.snapshot(s) for s in SERVICES}

                    def caught_up() -> bool:
                        return all(
                            (s, snap.epoch, snap.revision) in tally.revisions
                            for s, snap in snapshots.items()
                        )

                    async with asyncio.timeout(20), progress:
                        await progress.wait_for(caught_up)
                    for task in followers:
                        task.cancel()

            new_epoch: dict[str, set[int]] = defaultdict(set)
            for service, epoch, revision in tally.revisions:
                if epoch == snapshots[service].epoch:
                    new_epoch[service].add(revision)
            gaps = sum(
                snapshots[s].revision - min(revs) + 1 - len(revs) for s, revs in new_epoch.items()
            )
            for service, snap in snapshots.items():
                listed = {i.instance_id for i in snap.instances}
                want = {i for i, (s, _) in fleet.alive.items() if s == service}
                assert listed == want, (service, listed ^ want)
                assert set(views[service].instances) == listed
                assert snap.epoch != before[service], f"{service}: no new epoch after failover"
            resynced = sum(views[s].resyncs - resyncs[s] for s in SERVICES)
            print(
                f"\nsentinel failover: new registration visible {healed:.2f} s after the"
                f" master was killed; watcher resyncs {resynced} over {len(SERVICES)} views;"
                f" revisions checked {len(tally.revisions)}; conflicting contents"
                f" {len(tally.conflicts)}; new-epoch gaps {gaps}; false expiries"
                f" {len(tally.false_expiries)}; missing live {len(tally.missing_live)}"
            )
            assert tally.conflicts == []
            assert tally.false_expiries == []
            assert tally.missing_live == []
            assert tally.phantom_adds == []
            assert gaps == 0, dict(new_epoch)
        finally:
            for proc in workers.values():
                stop_process(proc, signal.SIGTERM)
            conn = await connect_amqp(settings, "ha-cleanup")
            try:
                channel = await conn.channel()
                for service in SERVICES:
                    await channel.queue_delete(c.group_queue(settings.namespace, service, "ha"))
            finally:
                await conn.close()
