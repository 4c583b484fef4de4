"""busreg on a Redis Cluster (brokers/redis-cluster.sh: 3 masters + 3 replicas).

Every script declares every key it touches, because that is all Redis Cluster guarantees:
while a slot migrates, a key may already be on the new master, and only declared keys make
the old one answer TRYAGAIN instead of running the script on half the partition. Issue 12;
guards invariants 2 (state and outbox change together or not at all) and 5 (no phantom
revision: a heartbeat read against a missing hash would be announced as ``added``).

The whole data path on a cluster (worker, partitions on every master, watchers, status,
purge) is CI stage (e4): the Redis-facing test files with BUSREG_TEST_REDIS_URL naming a
cluster. This file holds what only a cluster can show.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from busreg.errors import ConnectionFailed
from busreg.server.store import Lease, PartitionStore
from busreg.settings import Settings
from busreg.transport.connections import connect_redis
from busreg.wire.codec import encode_stored
from busreg.wire.models import Heartbeat, InstanceStatus

from .workload import brokers_script, run_script

pytestmark = pytest.mark.servers

SCRIPT = Path(__file__).resolve().parents[2] / "brokers" / "redis-cluster.sh"
#: ports of this file's own cluster: not the ones CI stage (e4) runs the suite on
PORTS = "7031 7032 7033 7034 7035 7036"
T = 1_700_000_000_000
US = b"\x1f"


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    state = tmp_path_factory.mktemp("cluster")
    with brokers_script(SCRIPT, state, BUSREG_CLUSTER_PORTS=PORTS) as env:
        yield env


@pytest_asyncio.fixture
async def store(cluster_env: dict[str, str]) -> AsyncIterator[PartitionStore]:
    settings = Settings(redis_url=run_script(SCRIPT, cluster_env, "url"))
    redis = await connect_redis(settings)
    st = PartitionStore(redis, f"t{uuid.uuid4().hex[:10]}")
    try:
        yield st
    finally:
        try:
            await st.purge(1)
        finally:
            await redis.aclose()


def _event(off: int, ts: int, iid: str, seq: int) -> tuple[object, ...]:
    version = f"{1:020d}{seq:016d}"
    payload = encode_stored(
        Heartbeat(
            service="mig",
            instance_id=iid,
            incarnation=1,
            seq=seq,
            address="10.0.0.1:80",
            status=InstanceStatus.UP,
            ttl=30.0,
        )
    )
    return (off, ts, "U", "mig", iid, version, 30_000, payload)


async def _apply(store: PartitionStore, lease: Lease, *events: tuple[object, ...]) -> int:
    args = [a for ev in events for a in ev]
    res = await store.apply(lease, args, 1_000, 60_000, 5_000)
    return res.changes


class SlotMove:
    """Moves one slot between two masters by hand, as ``redis-cli --cluster reshard``
    does: IMPORTING/MIGRATING, MIGRATE key by key, then SETSLOT NODE on every master."""

    def __init__(self, masters: list[str], source: str, target: str, slot: int) -> None:
        self.masters, self.slot = masters, slot
        self.source_addr, self.target_addr = source, target
        self.source = aioredis.Redis(host="127.0.0.1", port=_port(source))
        self.target = aioredis.Redis(host="127.0.0.1", port=_port(target))
        self.target_id = ""
        self.finished = False

    async def begin(self) -> None:
        source_id = (await self.source.execute_command("CLUSTER", "MYID")).decode()
        self.target_id = (await self.target.execute_command("CLUSTER", "MYID")).decode()
        await self.target.execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", source_id)
        await self.source.execute_command(
            "CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.target_id
        )

    async def migrate(self, key: str) -> None:
        host, port = self.target_addr.rsplit(":", 1)
        await self.source.execute_command("MIGRATE", host, port, key, 0, 5_000)

    async def finish(self) -> None:
        """The rest of the slot's keys, then every master learns the new owner."""
        if self.finished or not self.target_id:
            return
        self.finished = True
        for key in await self.source.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 1000):
            await self.migrate(key)
        for addr in self.masters:
            node = aioredis.Redis(host="127.0.0.1", port=_port(addr))
            try:
                await node.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.target_id)
            finally:
                await node.aclose()

    async def aclose(self) -> None:
        try:
            await self.finish()  # a failed test must not leave the slot half-moved
        finally:
            await self.source.aclose()
            await self.target.aclose()


def _port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


async def test_a_migrating_slot_defers_a_batch_instead_of_splitting_it(
    store: PartitionStore, cluster_env: dict[str, str]
) -> None:
    """Mid-migration, with the service hash already on the new master and the rest of the
    partition still on the old one, a batch must not run (TRYAGAIN, retried by the worker
    as a transient failure) and nothing may be written on either side; once the slot has
    moved, the same heartbeats apply there once, and nothing is announced twice under one
    (epoch, revision).
    Before every key was declared, the script ran on the old master, found no hash for
    the service and announced both instances ``added`` again (or, asked via ASK on the
    new master, found no fence and reported the worker fenced)."""
    lease = await store.acquire(0, "w1", 60_000)
    assert lease is not None
    assert await _apply(store, lease, _event(0, T, "a", 1), _event(1, T, "b", 1)) == 2
    prefix = store.prefix(0)
    source = run_script(SCRIPT, cluster_env, "master-of", prefix + "state")
    masters = run_script(SCRIPT, cluster_env, "masters").split()
    target = next(m for m in masters if m != source)
    slot = int(await store.redis.cluster_keyslot(prefix + "state"))  # type: ignore[union-attr]
    move = SlotMove(masters, source, target, slot)
    heartbeats = (_event(2, T + 10, "a", 2), _event(3, T + 10, "b", 2))
    try:
        await move.begin()
        await move.migrate(prefix + "s:mig")
        before = {k: await move.source.dump(k) for k in await move.source.keys(prefix + "*")}

        with pytest.raises(ConnectionFailed, match=r"TTL exhausted|TRYAGAIN|not ready"):
            await _apply(store, lease, *heartbeats)
        after = {k: await move.source.dump(k) for k in await move.source.keys(prefix + "*")}
        assert after == before
        assert await move.source.llen(prefix + "outbox") == 2

        await move.finish()
        async with asyncio.timeout(10):
            while True:  # served as soon as the client follows MOVED to the new master
                try:
                    changes = await _apply(store, lease, *heartbeats)
                    break
                except ConnectionFailed:
                    await asyncio.sleep(0.05)  # poll interval while the slot map settles
        # The state now sits on a master with another replication id. From inside the
        # script a migration looks like a promotion that may have lost writes, so the
        # partition takes a new epoch and announces its instances once (apply.lua):
        # subscribers resync; nothing of the old epoch is issued again.
        outbox = await move.target.lrange(prefix + "outbox", 0, -1)
        deltas = [json.loads(e.split(US, 2)[2]) for e in outbox]
        seen = [
            (d["epoch"], d["revision"], d["kind"], d["instance"]["instance_id"]) for d in deltas
        ]
        old, new = lease.epoch, deltas[-1]["epoch"]
        assert new != old
        assert seen == [
            (old, 1, "added", "a"),
            (old, 2, "added", "b"),
            (new, 1, "added", "a"),
            (new, 2, "added", "b"),
        ]
        assert changes == 2  # the announcement; the heartbeats themselves change nothing
        snap = await store.snapshot(0, "mig")
        assert [i.instance_id for i in snap.instances] == ["a", "b"]
        assert (snap.epoch, snap.revision) == (new, 2)
    finally:
        await move.aclose()
