"""RabbitMQ node loss under load, on a 3-node cluster (issue 12).

brokers/rabbitmq-cluster.sh starts rabbit-{a,b,c}; busreg is given all three nodes
(``amqp_url`` and ``stream_url`` with three URLs each), so partition streams get 3 replicas
with leaders spread over the nodes, and ``<ns>.rpc``, ``<ns>.deadletter`` and group
queues are quorum queues. Two workers, 100 instances over 10 services heartbeating, a
watcher and a consumer group per service. Then:

1. SIGKILL the node that leads the most partition streams; a registration is made at
   once, and an instance is killed during the failover; the node is brought back;
2. SIGKILL the node the watchers are connected to; a registration is made at once.

Afterwards: every instance is listed, every view equals a fresh snapshot, no false expiry,
no live instance missing from a view, the groups saw every revision of each epoch (gaps 0)
with one content each, and the registrations confirmed during the failures are present.
Measured and printed: kill -> ingest confirmed again, kill -> the delta seen by a watcher,
and the crash detection (over TTL) of the instance killed during the failover.

Guards invariants 1 (confirmed means kept: a registration confirmed during a node loss is
applied), 4 (no false expiry while the broker fails over) and 5 (revisions and resyncs).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from busreg import DeltaKind, Registry, Settings
from busreg import constants as c
from busreg.errors import ConnectionFailed
from busreg.ops.admin import applied_namespace
from busreg.settings import ClientSettings, WorkerSettings
from busreg.transport.connections import connect_amqp

from .helpers import spawn_worker, stop_process
from .workload import Fleet, Tally, judge

pytestmark = [pytest.mark.servers, pytest.mark.soak, pytest.mark.timeout(400)]

SCRIPT = Path(__file__).resolve().parents[2] / "brokers" / "rabbitmq-cluster.sh"
SERVICES = [f"rc{n}" for n in range(10)]
PER_SERVICE = 10
PORT_NODE = {5681: "a", 5682: "b", 5683: "c"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {**os.environ, "BUSREG_BROKERS_STATE": str(tmp_path / "brokers")}
    try:
        subprocess.run(["bash", str(SCRIPT), "start"], env=env, check=True, timeout=180)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"brokers/rabbitmq-cluster.sh start failed: {exc}")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, check=False, timeout=120)


def _sh(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, check=True, timeout=120, capture_output=True
    )
    return out.stdout.decode().strip()


async def _ash(env: dict[str, str], *args: str) -> str:
    """``_sh`` off the event loop: a node restart takes seconds, and a blocked loop would
    stall this process's heartbeats past their TTL (the instances would expire for that)."""
    return await asyncio.to_thread(_sh, env, *args)


async def test_node_loss_under_load(
    busreg_settings: Settings, cluster: dict[str, str], tmp_path: Path
) -> None:
    amqp_urls, stream_urls = _sh(cluster, "urls").splitlines()
    base = busreg_settings.model_copy(
        update={
            "amqp_url": amqp_urls,
            "stream_url": stream_urls,
            "worker": WorkerSettings(lease_ttl=1.5, drain_timeout=5.0),
            "client": ClientSettings(heartbeat_interval=1.0, ttl=3.0, request_timeout=10.0),
        }
    )
    fleet, tally = Fleet(), Tally()
    figures: dict[str, float] = {}
    async with applied_namespace(base) as settings:
        leaders = Counter(
            line.split()[1].split("@")[0].removeprefix("rabbit-")
            for line in _sh(cluster, "leaders", f"{settings.namespace}.ingest-").splitlines()
        )
        assert sum(leaders.values()) == settings.partitions, leaders
        workers = {w: spawn_worker(settings, w, tmp_path / f"{w}.log") for w in ("c-a", "c-b")}
        try:
            async with (
                Registry(settings, name="rc-apps") as apps,
                Registry(settings, name="rc-observer") as observer,
            ):
                views = {s: await observer.watch(s, resync_interval=None) for s in SERVICES}
                ready = {s: asyncio.Event() for s in SERVICES}
                progress = asyncio.Condition()
                removed_at: dict[str, float] = {}
                group_ack_failures: Counter[str] = Counter()

                async def follow_group(service: str) -> None:
                    async with observer.consume_group(service, "rc") as messages:
                        ready[service].set()
                        async for message in messages:
                            d = message.delta
                            content = f"{d.kind}:{d.instance.model_dump_json()}"
                            tally.record(service, d.epoch, d.revision, content)
                            iid = d.instance.instance_id
                            judge(fleet, tally, f"group {service}", d.kind, iid, d.reason or "")
                            try:
                                await message.ack()
                            except ConnectionFailed:
                                # the node went with the channel: the broker redelivers it
                                # (at least once), and the iterator goes on on another node
                                group_ack_failures[service] += 1
                            async with progress:
                                progress.notify_all()

                async def follow_view(service: str) -> None:
                    async for ch in views[service].changes():
                        if ch.kind is DeltaKind.REMOVED:
                            removed_at.setdefault(ch.instance_id, time.monotonic())
                        who = f"view {service}"
                        judge(fleet, tally, who, ch.kind, ch.instance_id, ch.reason or "")

                async def register(service: str, iid: str) -> None:
                    fleet.regs[iid] = await apps.register(
                        service, address=f"127.0.0.1:{21000 + len(fleet.regs)}", instance_id=iid
                    )
                    fleet.alive[iid] = (service, time.monotonic())
                    fleet.heartbeating.add(iid)

                async def settled() -> None:
                    for service in SERVICES:
                        want = {i for i, (s, _) in fleet.alive.items() if s == service}
                        await views[service].wait_for(lambda i, w=want: set(i) == w, timeout=60)

                async def probe(name: str, node: str) -> None:
                    """Kill ``node``, register at once, and time ingest and delivery."""
                    await _ash(cluster, "kill", node)
                    killed = time.monotonic()
                    await register(SERVICES[0], name)
                    figures[f"{name}: kill -> ingest confirmed"] = time.monotonic() - killed
                    try:
                        await views[SERVICES[0]].wait_for(lambda i: name in i, timeout=30)
                    except TimeoutError:
                        v = views[SERVICES[0]]
                        snap = await observer.snapshot(SERVICES[0])
                        raise AssertionError(
                            f"{name} not seen: view epoch {v.epoch} rev {v.revision} rebind "
                            f"{v._rebind} resyncs {v.resyncs} failures {v._failures.failures} "
                            f"queue {v._queue.name if v._queue else None} channel closed "
                            f"{v._channel.is_closed if v._channel else None}; snapshot "
                            f"{snap.epoch} rev {snap.revision} has it: "
                            f"{name in {i.instance_id for i in snap.instances}}"
                        ) from None
                    figures[f"{name}: kill -> watcher saw it"] = time.monotonic() - killed

                async with asyncio.TaskGroup() as tg:
                    followers = [tg.create_task(follow_group(s)) for s in SERVICES]
                    followers += [tg.create_task(follow_view(s)) for s in SERVICES]
                    async with asyncio.timeout(20):
                        for event in ready.values():
                            await event.wait()
                    for service in SERVICES:
                        for n in range(PER_SERVICE):
                            await register(service, f"{service}-{n}")
                    await settled()

                    # 1. the node leading the most partition streams; an instance dies too
                    busiest = leaders.most_common(1)[0][0]
                    victim = f"{SERVICES[1]}-0"
                    probe_task = asyncio.create_task(probe("probe-1", busiest))
                    fleet.heartbeating.discard(victim)
                    fleet.regs.pop(victim).abandon()
                    crashed = time.monotonic()
                    fleet.alive.pop(victim)
                    fleet.ended[victim] = crashed
                    await probe_task
                    await views[SERVICES[1]].wait_for(lambda i: victim not in i, timeout=60)
                    # its last heartbeat was up to one interval before it died
                    figures["crash during failover -> removed, minus TTL"] = (
                        removed_at[victim] - crashed - settings.client.ttl
                    )
                    await settled()
                    await _ash(cluster, "restart", busiest)
                    await settled()

                    # 2. the node the watchers are connected to
                    assert observer._amqp is not None
                    theirs = PORT_NODE[int(observer._amqp.url.port or 0)]
                    await probe("probe-2", theirs)
                    await settled()
                    await _ash(cluster, "restart", theirs)
                    await settled()

                    snapshots = {s: await observer.snapshot(s) for s in SERVICES}

                    def caught_up() -> bool:
                        return all(
                            (s, snap.epoch, snap.revision) in tally.revisions
                            for s, snap in snapshots.items()
                        )

                    async with asyncio.timeout(30), progress:
                        await progress.wait_for(caught_up)
                    for task in followers:
                        task.cancel()

            epochs: dict[tuple[str, str], set[int]] = defaultdict(set)
            for service, epoch, revision in tally.revisions:
                epochs[(service, epoch)].add(revision)
            gaps = 0
            for (service, epoch), seen in epochs.items():
                top = max(seen)
                if epoch == snapshots[service].epoch:
                    top = max(top, snapshots[service].revision)
                gaps += top - len(seen & set(range(1, top + 1)))
            for service, snap in snapshots.items():
                listed = {i.instance_id for i in snap.instances}
                want = {i for i, (s, _) in fleet.alive.items() if s == service}
                assert listed == want, (service, snap.epoch, snap.revision, sorted(listed ^ want))
                assert set(views[service].instances) == listed
            print(
                f"\nrabbitmq cluster (leaders {dict(leaders)}; killed {busiest}, then {theirs}): "
                + "; ".join(f"{k} {v:.2f} s" for k, v in figures.items())
                + f"; revisions checked {len(tally.revisions)}; gaps {gaps}; conflicting"
                f" contents {len(tally.conflicts)}; false expiries {len(tally.false_expiries)};"
                f" missing live {len(tally.missing_live)}; phantom adds {len(tally.phantom_adds)};"
                f" group acks lost with their node {sum(group_ack_failures.values())}"
            )
            assert tally.false_expiries == []
            assert tally.missing_live == []
            assert tally.phantom_adds == []
            assert tally.conflicts == []
            assert gaps == 0, sorted(epochs.items())
        finally:
            for proc in workers.values():
                stop_process(proc, signal.SIGTERM)
            conn = await connect_amqp(settings, "rc-cleanup")
            try:
                channel = await conn.channel()
                for service in SERVICES:
                    await channel.queue_delete(c.group_queue(settings.namespace, service, "rc"))
            finally:
                await conn.close()
