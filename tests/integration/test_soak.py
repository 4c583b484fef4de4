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
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from busreg import Registry, Settings
from busreg.ops.admin import applied_namespace
from busreg.settings import ClientSettings, WorkerSettings
from busreg.wire.routing import partition_for
from tests.faultproxy import FaultProxy

from .helpers import owners, spawn_worker, stop_process
from .private_servers import PrivateRedis, private_redis
from .workload import Fleet, Observers, Tally, delete_groups, end, register

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

    async def arrive(service: str) -> None:
        nonlocal serial
        serial += 1
        await register(fleet, apps, service, f"{service}-i{serial}")

    try:
        async with (
            Registry(settings, name="soak-apps") as apps,
            Registry(settings, name="soak-observer") as observer,
            Observers(observer, SERVICES, "soak", fleet, tally) as obs,
        ):
            for service in SERVICES:
                for _ in range(PER_SERVICE):
                    await arrive(service)
            await obs.settled(timeout=30)

            chaos_for = SECONDS - QUIET
            chaos = [
                proxies["redis"].chaos(1, 1.0, max_faults=None, duration=chaos_for, max_hold=0.4),
                proxies["amqp"].chaos(2, 0.3, max_faults=None, duration=chaos_for, max_hold=0.4),
                proxies["stream"].chaos(3, 0.3, max_faults=None, duration=chaos_for, max_hold=0.4),
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
                await end(fleet, leaving, crash=False)
                await arrive(fleet_service(leaving))
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
                        await end(fleet, iid, crash=True)
                        workers["w-c"] = spawn_worker(faulty, "w-c", tmp_path / "w-c.log")
                    elif what == "restart redis empty":
                        redis_server.kill()
                        redis_server.start()
                    else:
                        await end(fleet, rng.choice(sorted(fleet.heartbeating)), crash=True)
            await asyncio.gather(*chaos)

            # quiet: every view holds exactly the live instances, and equals a snapshot
            await obs.settled(timeout=QUIET + 20)
            _, gaps = await obs.final_check(timeout=20)

        faults = {name: p.stats.faults_injected for name, p in proxies.items()}
        epochs = {(s, e) for s, e, _ in tally.revisions}
        print(
            f"\nsoak {SECONDS:.0f}s: faults injected {sum(faults.values())} {faults}"
            f" + {dict(big_faults)}; revisions checked {len(tally.revisions)} over"
            f" {len(epochs)} (service, epoch) pairs; gaps {gaps}; false expiries"
            f" {len(tally.false_expiries)}; phantom adds {len(tally.phantom_adds)};"
            f" missing live instances {len(tally.missing_live)}; instances registered"
            f" {serial}, alive at the end {len(fleet.alive)}"
        )
        assert sum(big_faults.values()) == 3, big_faults
        obs.assert_clean(gaps)
    finally:
        for proc in workers.values():
            stop_process(proc, signal.SIGTERM)
        await delete_groups(settings, SERVICES, "soak")


def fleet_service(iid: str) -> str:
    return iid.rsplit("-i", 1)[0]
