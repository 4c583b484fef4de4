"""A publish that fails for one service stops neither the other partitions nor the RPC
replies ("Fault paths that hold", item 5).

Before, every runner and the RPC replies shared one confirm channel and one never-invalidated
set of declared service exchanges: an operator deleting a service's exchange turned that
service's next delta into a 404 that closed the shared channel, every retry was a 404 again
(the exchange counted as declared, so it was never re-declared), and meanwhile the other
partitions' deltas and the snapshot replies failed with it. Nor is a channel of its own per
partition enough on the worker's connection: aiormq still sends the publishes queued behind
the refused one, and the broker answers those by closing the whole connection (504
CHANNEL_ERROR), so the victim's partition here also carries neighbours whose deltas are
published in the same batches as the victim's.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from busreg import Registry, Settings
from busreg import constants as c
from busreg.client.view import ServiceView
from busreg.testing import running_worker
from busreg.transport.connections import connect_amqp
from busreg.wire.routing import partition_for
from tests.integration.helpers import eventually

pytestmark = [pytest.mark.servers, pytest.mark.busreg(partitions=4)]

#: how long a change may take to reach a watcher, or a snapshot to answer, while the
#: victim's publishes fail (a healthy path takes milliseconds)
DEADLINE = 3.0


#: services sharing the victim's partition (and so its outbox batches)
NEIGHBOURS = 8


def one_service_per_partition(partitions: int) -> list[str]:
    found: dict[int, str] = {}
    for n in itertools.count():
        name = f"svc{n}"
        found.setdefault(partition_for(name, partitions), name)
        if len(found) == partitions:
            return [found[k] for k in range(partitions)]
    raise AssertionError("unreachable")


def services_of_partition(k: int, partitions: int, count: int) -> list[str]:
    names = (f"nb{n}" for n in itertools.count())
    return list(itertools.islice((s for s in names if partition_for(s, partitions) == k), count))


async def exchange_exists(connection: AbstractRobustConnection, name: str) -> bool:
    # a failed passive declare closes its channel: use a throwaway one
    channel = await connection.channel()
    try:
        await channel.declare_exchange(name, passive=True, robust=False)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()
    return True


async def test_a_deleted_service_exchange_fails_only_that_service_and_heals(
    busreg_namespace: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="busreg.worker")
    settings = busreg_namespace
    ns = settings.namespace
    victim, *others = one_service_per_partition(settings.partitions)
    assert len({partition_for(s, settings.partitions) for s in [victim, *others]}) == 4
    neighbours = services_of_partition(
        partition_for(victim, settings.partitions), settings.partitions, NEIGHBOURS
    )
    everyone = [victim, *neighbours, *others]
    victim_k = partition_for(victim, settings.partitions)

    async def sees(view: ServiceView, instance_id: str) -> None:
        await view.wait_for(lambda i: instance_id in i, timeout=DEADLINE)

    async def snapshot_has(registry: Registry, service: str, instance_id: str) -> None:
        async with asyncio.timeout(DEADLINE):  # (c) served over RPC, answered in time
            snap = await registry.snapshot(service)
        assert instance_id in {i.instance_id for i in snap.instances}

    async with (
        running_worker(settings),
        Registry(settings, name="isolation") as registry,
    ):

        async def change_all(n: int) -> None:
            # at once: the victim's partition applies (and publishes) them in few batches
            await asyncio.gather(
                *(
                    registry.register(s, address="127.0.0.1:1", instance_id=f"{s}-{n}")
                    for s in everyone
                )
            )

        views = {s: await registry.watch(s, resync_interval=None) for s in everyone}
        await change_all(0)
        for s in everyone:
            await sees(views[s], f"{s}-0")

        operator = await connect_amqp(settings, "isolation-operator")
        try:
            channel = await operator.channel()
            for n in range(1, 4):
                # an operator deletes the victim's exchange, and the victim changes: its
                # delta goes to a missing exchange until the worker declares it again
                await channel.exchange_delete(c.service_exchange(ns, victim))
                await change_all(n)
                # (a) the other partitions' changes keep reaching their watchers (and the
                # neighbours' too, once the victim's retry re-declared its exchange)
                for s in [*others, *neighbours]:
                    await sees(views[s], f"{s}-{n}")
                # (c) snapshots keep answering, for every service
                for s in everyone:
                    await snapshot_has(registry, s, f"{s}-{n}")

            # (b) the worker re-declares the victim's exchange and publishes to it again.
            # Nothing else declares it meanwhile: the first view's binding went with the
            # exchange, and as its queue is still there it does not re-bind. The worker has
            # no notification for "published", so its effect on the broker is polled.
            await eventually(
                lambda: exchange_exists(operator, c.service_exchange(ns, victim)),
                bool,
                timeout=DEADLINE,
                what=f"the worker to re-declare the exchange of {victim}",
            )
            # watch afresh from a second client (the old view's queue is unbound)
            async with Registry(settings, name="isolation-late") as late:
                fresh = await late.watch(victim, resync_interval=None)
                await sees(fresh, f"{victim}-3")
                applied = fresh.deltas_applied
                await registry.register(victim, address="127.0.0.1:1", instance_id=f"{victim}-4")
                await sees(fresh, f"{victim}-4")
                assert fresh.deltas_applied > applied  # delivered as a delta, not a snapshot
                # and everyone else is still fine
                await change_all(5)
                for s in [*others, *neighbours]:
                    await sees(views[s], f"{s}-5")
                await sees(fresh, f"{victim}-5")
                await snapshot_has(registry, victim, f"{victim}-5")
        finally:
            await operator.close()

    # the victim's partition retried its publishes (what the test is about) ...
    failures = [r.getMessage() for r in caplog.records if r.name == "busreg.worker"]
    assert any(m.startswith(f"partition={victim_k} delta publish failed") for m in failures)
    # ... and nothing else of the worker failed meanwhile: no other partition's publish
    # (each retried within the deadlines above, so only the log tells) and no RPC reply
    others_failed = [
        m
        for m in failures
        if ("failed" in m and not m.startswith(f"partition={victim_k} ")) or "rpc reply" in m
    ]
    assert not others_failed
