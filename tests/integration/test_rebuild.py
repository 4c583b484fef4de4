"""A rebuild after Redis lost everything never invents state: no past transition is
announced as new, no live instance goes missing from a view, and a consumer group's
history in the new epoch starts from the caught-up state.

Guards invariants 4 (no false expiry: live instances never vanish) and 5 (revisions:
subscribers converge on a snapshot once the epoch changes).
"""

from __future__ import annotations

import asyncio

import pytest

from busreg import DeltaKind, Registry, Settings
from busreg.server.store import PartitionStore
from busreg.server.worker import Worker
from busreg.transport.connections import connect_redis
from busreg.wire.models import Delta

pytestmark = pytest.mark.servers

SERVICE = "rebuilt"


async def test_redis_data_loss_is_rebuilt_silently(
    busreg_worker: Worker, busreg_namespace: Settings
) -> None:
    settings = busreg_namespace
    live = {f"live-{n}" for n in range(3)}
    async with Registry(settings) as apps, Registry(settings) as watcher:
        view = await watcher.watch(SERVICE, resync_interval=None)
        for iid in sorted(live):
            await apps.register(SERVICE, address="127.0.0.1:9000", instance_id=iid)
        # history the stream keeps: one deregistered, one expired
        left = await apps.register(SERVICE, address="127.0.0.1:9001", instance_id="left")
        gone = await apps.register(SERVICE, address="127.0.0.1:9002", instance_id="gone")
        await view.wait_for(lambda i: len(i) == 5, timeout=10)
        await left.deregister()
        gone.abandon()
        await view.wait_for(lambda i: set(i) == live, timeout=10)
        old_epoch = view.epoch

        group: list[Delta] = []
        converged = asyncio.Event()
        missing: list[str] = []

        async def follow_group() -> None:
            async with watcher.consume_group(SERVICE, "audit") as messages:
                async for message in messages:
                    await message.ack()
                    if message.delta.epoch != old_epoch:
                        group.append(message.delta)
                        if {d.instance.instance_id for d in group} >= live:
                            converged.set()

        async def watch_view() -> None:
            async for change in view.changes():
                if change.kind is DeltaKind.REMOVED and change.instance_id in live:
                    missing.append(f"{change.instance_id} ({change.reason})")

        async with asyncio.TaskGroup() as tg:
            followers = [tg.create_task(follow_group()), tg.create_task(watch_view())]
            # the data loss: every key of the namespace, leases included, is gone
            redis = await connect_redis(settings)
            try:
                await PartitionStore(redis, settings.namespace).purge(settings.partitions)
            finally:
                await redis.aclose()
            async with asyncio.timeout(20):
                await converged.wait()
            # a view converges once it sees the new epoch (a resync of the caught-up state)
            await view.wait_for(lambda _: view.epoch != old_epoch, timeout=10)
            for task in followers:
                task.cancel()

        # the new epoch's history is the caught-up state: the live instances, added once
        assert sorted((d.kind, d.instance.instance_id) for d in group) == [
            (DeltaKind.ADDED, iid) for iid in sorted(live)
        ]
        assert [d.revision for d in sorted(group, key=lambda d: d.revision)] == [1, 2, 3]
        assert missing == []
        # the namespace cleanup knows services, not their groups: delete what we declared
        from busreg import constants as c
        from busreg.transport.connections import connect_amqp

        conn = await connect_amqp(settings, "rebuild-cleanup")
        try:
            channel = await conn.channel()
            await channel.queue_delete(c.group_queue(settings.namespace, SERVICE, "audit"))
        finally:
            await conn.close()
        snapshot = await watcher.snapshot(SERVICE)
        assert snapshot.epoch == view.epoch
        assert set(view.instances) == {i.instance_id for i in snapshot.instances} == live
