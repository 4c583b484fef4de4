"""Batched heartbeats end to end (contract v2): one Registry holding many registrations
renews them in a few messages per interval, with auth enforced per service, and no instance
expires; an instance of the same process that stops beating still does."""

from __future__ import annotations

import asyncio

import pytest

from busreg import DeltaKind, Registry, Settings
from busreg.settings import AuthSettings
from busreg.testing import running_worker

from .helpers import eventually

pytestmark = [pytest.mark.servers, pytest.mark.busreg(partitions=2)]

SERVICES = [f"batched{i}" for i in range(6)]
PER_SERVICE = 3


async def test_a_fleet_in_one_process_renews_in_batches_and_nothing_expires(
    busreg_namespace: Settings,
) -> None:
    settings = busreg_namespace.model_copy(
        update={"auth": AuthSettings(mode="enforce", secret="batched-secret")}
    )
    async with running_worker(settings) as worker, Registry(settings) as registry:
        view = await registry.watch(SERVICES[0], resync_interval=None)
        changes = view.changes()
        regs = [
            await registry.register(
                service,
                address=f"127.0.0.1:{8000 + n}",
                instance_id=f"{service}-{n}",
                ttl=1.0,
                interval=0.25,
            )
            for service in SERVICES
            for n in range(PER_SERVICE)
        ]
        await view.wait_for(lambda i: len(i) == PER_SERVICE, timeout=10)
        publisher = await registry._ingest()
        batcher = publisher.batcher
        assert batcher is not None
        # eight intervals: two TTLs of renewals that only batches carried
        target = batcher.items + 8 * len(regs)
        await eventually(
            lambda: _items(batcher),
            lambda n: n >= target,
            timeout=15,
            what="eight rounds of batched heartbeats",
        )
        # batched for real: far fewer messages than heartbeats (2 partitions per round)
        assert batcher.batches * 3 <= batcher.items
        assert set(view.instances) == {f"{SERVICES[0]}-{n}" for n in range(PER_SERVICE)}
        owned = worker.status().owned.values()
        assert sum(s.dead_lettered for s in owned) == 0  # every item verified
        assert sum(s.expired for s in owned) == 0
        # one instance stops beating (its host died): only it expires
        regs[0].abandon()
        async with asyncio.timeout(10):
            async for change in changes:
                if change.kind is DeltaKind.REMOVED:
                    assert change.instance_id == regs[0].instance_id
                    assert change.reason == "expired"
                    break
        for reg in regs[1:]:
            await reg.deregister()


async def _items(batcher: object) -> int:
    await asyncio.sleep(0)
    return int(batcher.items)  # type: ignore[attr-defined]
