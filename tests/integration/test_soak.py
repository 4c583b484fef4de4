"""Soak: the whole system under random faults, with the big ones on top (issue 11).

Two worker processes reach a private Redis, RabbitMQ's AMQP port and its stream port
through fault proxies that delay, stall, reset, refuse and drop replies at random; 100
instances over 10 services heartbeat (straight to the broker: the faults are on the
registry's side), a few deregister and register every second; each service has a consumer
group and a watcher. On top: a worker is SIGKILLed together with an instance of one of its
partitions, the Redis is restarted empty once, and another instance dies on its own.

At the end (after a quiet period), and counted all along:

* every live instance is listed, and each watcher's view equals a fresh snapshot;
* no instance expired while it was heartbeating (false expiries: 0);
* every consumer group saw every revision of every service, in each epoch from 1 to its
  last, and in the last epoch up to the snapshot's revision (gaps: 0);
* no ``added`` for an instance that was not alive (phantom adds: 0), and no live instance
  dropped from a view at any moment (missing live instances: 0).

Guards invariants 2 (every change is published once the batch commits), 3 (fencing: a
killed owner's partitions move without double effects), 4 (no false expiry, bounded
detection) and 5 (revisions without gaps; views converge after an epoch change).
``BUSREG_SOAK_SECONDS`` makes it longer (default 60).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from busreg import Registry, Settings
from busreg import constants as c
from busreg.ops.admin import applied_namespace
from busreg.settings import ClientSettings, WorkerSettings
from busreg.transport.connections import connect_amqp
from busreg.wire.routing import partition_for
from tests.faultproxy import FaultProxy

from .helpers import eventually, owners, spawn_worker, stop_process
from .private_servers import PrivateRedis, private_redis
from .workload import Fleet, Tally, judge

pytestmark = [pytest.mark.servers, pytest.mark.soak, pytest.mark.timeout(600)]

SECONDS = float(os.environ.get("BUSREG_SOAK_SECONDS", "60"))
SERVICES = [f"soak{n}" for n in range(10)]
PER_SERVICE = 10
#: quiet time at the end: no faults, no churn, for everything to converge
QUIET = 10.0


async def test_soak(busreg_settings: Settings, tmp_path: Path) -> None:
    rng = random.Random(11)
    amqp = urlsplit(busreg_settings.amqp_url)
    stream = busreg_settings.stream_endpoint()
    with private_redis() as redis_server:
        base = busreg_settings.model_copy(
            update={
                "redis_url": redis_server.url,
                "worker": WorkerSettings(lease_ttl=1.5, drain_timeout=5.0),
                "client": ClientSettings(heartbeat_interval=1.0, ttl=3.0, request_timeout=5.0),
            }
        )
        async with (
            applied_namespace(base) as settings,
            FaultProxy("127.0.0.1", urlsplit(redis_server.url).port or 6379) as redis_proxy,
            FaultProxy(amqp.hostname or "127.0.0.1", amqp.port or 5672) as amqp_proxy,
            FaultProxy(stream.host, stream.port) as stream_proxy,
        ):
            stream_url = f"rabbitmq-stream://guest:guest@{stream.host}:{stream.port}/"
            faulty = settings.model_copy(
                update={
                    "redis_url": redis_proxy.url_for(settings.redis_url),
                    "amqp_url": amqp_proxy.url_for(settings.amqp_url),
                    "stream_url": stream_proxy.url_for(stream_url),
                }
            )
            proxies = {"redis": redis_proxy, "amqp": amqp_proxy, "stream": stream_proxy}
            await _run(settings, faulty, proxies, redis_server, rng, tmp_path)


async def _run(
    settings: Settings,
    faulty: Settings,
    proxies: dict[str, FaultProxy],
    redis_server: PrivateRedis,
    rng: random.Random,
    tmp_path: Path,
) -> None:
    fleet, tally = Fleet(), Tally()
    workers: dict[str, subprocess.Popen[bytes]] = {
        w: spawn_worker(faulty, w, tmp_path / f"{w}.log") for w in ("w-a", "w-b")
    }
    big_faults: Counter[str] = Counter()
    serial = 0
    try:
        async with (
            Registry(settings, name="soak-apps") as apps,
            Registry(settings, name="soak-observer") as observer,
        ):
            views = {s: await observer.watch(s, resync_interval=None) for s in SERVICES}

            async def register(service: str) -> None:
                nonlocal serial
                serial += 1
                iid = f"{service}-i{serial}"
                fleet.regs[iid] = await apps.register(
                    service, address=f"127.0.0.1:{10000 + serial}", instance_id=iid
                )
                fleet.alive[iid] = (service, time.monotonic())
                fleet.heartbeating.add(iid)

            async def end(iid: str, *, crash: bool) -> None:
                fleet.heartbeating.discard(iid)
                reg = fleet.regs.pop(iid)
                if crash:
                    reg.abandon()
                else:
                    await reg.deregister()
                fleet.alive.pop(iid)
                fleet.ended[iid] = time.monotonic()

            ready = {s: asyncio.Event() for s in SERVICES}

            async def follow_group(service: str) -> None:
                async with observer.consume_group(service, "soak") as messages:
                    ready[service].set()  # declared: it gets every delta from now on
                    async for message in messages:
                        d = message.delta
                        tally.record(
                            service, d.epoch, d.revision, f"{d.kind}:{d.instance.model_dump_json()}"
                        )
                        judge(
                            fleet,
                            tally,
                            f"group {service}",
                            d.kind,
                            d.instance.instance_id,
                            d.reason or "",
                        )
                        await message.ack()

            async def follow_view(service: str) -> None:
                async for change in views[service].changes():
                    judge(
                        fleet,
                        tally,
                        f"view {service}",
                        change.kind,
                        change.instance_id,
                        change.reason or "",
                    )

            async with asyncio.TaskGroup() as tg:
                followers = [tg.create_task(follow_group(s)) for s in SERVICES]
                followers += [tg.create_task(follow_view(s)) for s in SERVICES]
                async with asyncio.timeout(10):
                    for event in ready.values():
                        await event.wait()
                for service in SERVICES:
                    for _ in range(PER_SERVICE):
                        await register(service)
                for service in SERVICES:
                    want = {i for i, (s, _) in fleet.alive.items() if s == service}
                    await views[service].wait_for(lambda i, w=want: w <= set(i), timeout=30)

                chaos_for = SECONDS - QUIET
                chaos = [
                    proxies["redis"].chaos(
                        1, 1.0, max_faults=None, duration=chaos_for, max_hold=0.4
                    ),
                    proxies["amqp"].chaos(
                        2, 0.3, max_faults=None, duration=chaos_for, max_hold=0.4
                    ),
                    proxies["stream"].chaos(
                        3, 0.3, max_faults=None, duration=chaos_for, max_hold=0.4
                    ),
                ]
                started = time.monotonic()
                events = {
                    0.25 * chaos_for: "kill worker and instance",
                    0.55 * chaos_for: "restart redis empty",
                    0.8 * chaos_for: "kill instance",
                }
                while (elapsed := time.monotonic() - started) < chaos_for:
                    # churn: one leaves, one arrives, every second (the schedule of the
                    # workload, not synchronisation)
                    await asyncio.sleep(1.0)
                    leaving = rng.choice(sorted(fleet.heartbeating))
                    await end(leaving, crash=False)
                    await register(fleet_service(leaving))
                    for at, what in list(events.items()):
                        if elapsed < at:
                            continue
                        del events[at]
                        big_faults[what] += 1
                        if what == "kill worker and instance":
                            held = await owners(settings)
                            victim = sorted(w for w in workers if w in held.values())[0]
                            mine = {k for k, w in held.items() if w == victim}
                            iid = next(
                                i
                                for i in sorted(fleet.heartbeating)
                                if partition_for(fleet.alive[i][0], settings.partitions) in mine
                            )
                            stop_process(workers.pop(victim), signal.SIGKILL)
                            await end(iid, crash=True)
                            workers["w-c"] = spawn_worker(faulty, "w-c", tmp_path / "w-c.log")
                        elif what == "restart redis empty":
                            redis_server.kill()
                            redis_server.start()
                        else:
                            await end(rng.choice(sorted(fleet.heartbeating)), crash=True)
                await asyncio.gather(*chaos)

                # quiet: every view holds exactly the live instances, and equals a snapshot
                async def settled(service: str) -> None:
                    want = {i for i, (s, _) in fleet.alive.items() if s == service}
                    try:
                        await views[service].wait_for(
                            lambda i, w=want: set(i) == w, timeout=QUIET + 20
                        )
                    except TimeoutError:
                        have = set(views[service].instances)
                        snap = await observer.snapshot(service)
                        listed = {i.instance_id for i in snap.instances}
                        raise AssertionError(
                            f"{service}: view lacks {sorted(want - have)}, has extra "
                            f"{sorted(have - want)}; snapshot (epoch {snap.epoch} rev "
                            f"{snap.revision}) lacks {sorted(want - listed)}, extra "
                            f"{sorted(listed - want)}; tally {tally.false_expiries} "
                            f"{tally.phantom_adds} {tally.missing_live}"
                        ) from None

                await asyncio.gather(*(settled(s) for s in SERVICES))
                snapshots = {s: await observer.snapshot(s) for s in SERVICES}

                async def group_caught_up() -> bool:
                    return all(
                        (s, snap.epoch, snap.revision) in tally.revisions
                        for s, snap in snapshots.items()
                    )

                await eventually(group_caught_up, bool, timeout=20, what="groups caught up")
                for task in followers:
                    task.cancel()

        gaps = 0
        epochs: dict[tuple[str, str], set[int]] = defaultdict(set)
        for service, epoch, revision in tally.revisions:
            epochs[(service, epoch)].add(revision)
        for (service, epoch), seen in epochs.items():
            top = max(seen)
            if epoch == snapshots[service].epoch:
                top = max(top, snapshots[service].revision)
            gaps += top - len(seen & set(range(1, top + 1)))
        for service, snap in snapshots.items():
            listed = {i.instance_id for i in snap.instances}
            want = {i for i, (s, _) in fleet.alive.items() if s == service}
            assert listed == want, (service, listed ^ want)
            assert set(views[service].instances) == listed
        faults = {name: p.stats.faults_injected for name, p in proxies.items()}
        print(
            f"\nsoak {SECONDS:.0f}s: faults injected {sum(faults.values())} {faults}"
            f" + {dict(big_faults)}; revisions checked {len(tally.revisions)} over"
            f" {len(epochs)} (service, epoch) pairs; gaps {gaps}; false expiries"
            f" {len(tally.false_expiries)}; phantom adds {len(tally.phantom_adds)};"
            f" missing live instances {len(tally.missing_live)}; instances registered"
            f" {serial}, alive at the end {len(fleet.alive)}"
        )
        assert sum(big_faults.values()) == 3, big_faults
        assert tally.false_expiries == []
        assert tally.phantom_adds == []
        assert tally.missing_live == []
        assert gaps == 0, sorted(epochs.items())
        assert tally.conflicts == []
    finally:
        for proc in workers.values():
            stop_process(proc, signal.SIGTERM)
        await _delete_groups(settings)


def fleet_service(iid: str) -> str:
    return iid.rsplit("-i", 1)[0]


async def _delete_groups(settings: Settings) -> None:
    """The namespace cleanup knows services, not their groups."""
    conn = await connect_amqp(settings, "soak-cleanup")
    try:
        channel = await conn.channel()
        for service in SERVICES:
            await channel.queue_delete(c.group_queue(settings.namespace, service, "soak"))
    finally:
        await conn.close()
