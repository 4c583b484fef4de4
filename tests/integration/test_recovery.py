"""Restarts, crashes and lost deltas: exact state afterwards, nothing applied twice."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from busreg import DeltaKind, Registry, Settings, partition_for
from busreg import constants as c
from busreg.client.registration import IngestPublisher
from busreg.server.publisher import DeltaPublisher
from busreg.server.runner import PartitionRunner
from busreg.server.worker import Worker
from busreg.tasks import cancel_until_done
from busreg.testing import running_worker
from busreg.transport.connections import connect_amqp, stream_producer
from busreg.transport.streams import StreamWriter
from busreg.wire.models import Heartbeat, Register

from .helpers import eventually, owners, partition_states, spawn_worker, stop_process

pytestmark = pytest.mark.servers


async def _publish_burst(settings: Settings, service: str, instances: int, beats: int) -> int:
    """Publish a register + ``beats`` heartbeats per instance, all fresh; return the count."""
    producer = await stream_producer(settings, "burst")
    stream = IngestPublisher(StreamWriter(settings, "unused"), settings).stream_for(service)
    from rstream import RawMessage

    from busreg.wire.codec import encode_event

    sent = 0
    try:
        batch = []
        for seq in range(1, beats + 2):
            for n in range(instances):
                kind = Register if seq == 1 else Heartbeat
                event = kind(
                    service=service,
                    instance_id=f"b-{n}",
                    incarnation=1,
                    seq=seq,
                    address=f"127.0.0.1:{1000 + n}",
                    ttl=60,
                )
                batch.append(RawMessage(encode_event(event)))
        for i in range(0, len(batch), 500):
            await producer.send_batch(stream, batch[i : i + 500])
            sent += len(batch[i : i + 500])
        # send_batch is asynchronous; a confirmed marker after it means all were stored
        await producer.send_wait(stream, RawMessage(b'{"v":1,"type":"tick","worker":"burst"}'))
    finally:
        await producer.close()
    return sent


@pytest.mark.busreg(partitions=2)
async def test_sigkilled_worker_resumes_from_committed_offset_and_applies_nothing_twice(
    busreg_namespace: Settings, tmp_path: Path
) -> None:
    settings = busreg_namespace
    service = "burst"
    k = partition_for(service, settings.partitions)
    # large enough that the kill lands mid-backlog even when one poll of the state takes
    # as long as a Redis Cluster connect (seen: 8,200 events all applied within one poll)
    total = await _publish_burst(settings, service, instances=200, beats=150)
    proc = spawn_worker(settings, "victim", tmp_path / "victim.log")
    try:
        # kill it mid-backlog: once it has committed some but not all of the events
        states = await eventually(
            lambda: partition_states(settings),
            lambda s: int(s[k].get("applied", 0)) > 0,
            timeout=20,
            what="the first committed batch",
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        stop_process(proc, signal.SIGKILL)
    partial = int((await partition_states(settings))[k].get("applied", 0))
    assert partial < total, "kill landed after the whole backlog; make the burst larger"
    del states
    async with running_worker(settings):
        final = await eventually(
            lambda: partition_states(settings),
            lambda s: int(s[k].get("applied", 0)) >= total,
            timeout=60,
            what="the backlog to be applied",
        )
    # every fresh event applied exactly once: the counter is committed with the offset
    assert int(final[k]["applied"]) == total
    assert int(final[k].get("stale", 0)) == 0
    print(f"killed after {partial}/{total} applied; replayed {final[k].get('replayed', 0)}")


async def test_delta_committed_before_a_crash_is_published_after_restart(
    busreg_namespace: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = busreg_namespace
    async with Registry(settings) as client:
        gate = asyncio.Event()
        real_publish = PartitionRunner._publish_with_retry

        async def stuck(self: PartitionRunner, entries: list[bytes]) -> None:
            gate.set()
            await asyncio.Future()  # the worker "dies" between commit and publish

        monkeypatch.setattr(PartitionRunner, "_publish_with_retry", stuck)
        async with Worker(settings, worker_id="doomed") as doomed, asyncio.TaskGroup() as tg:
            task = tg.create_task(doomed.run())
            view = await client.watch("outboxed")
            changes = view.changes()
            await client.register("outboxed", address="127.0.0.1:5000", instance_id="o-1")
            async with asyncio.timeout(10):
                await gate.wait()
            await cancel_until_done([task])  # hard stop: no drain, no release (like SIGKILL)
        k = partition_for("outboxed", settings.partitions)
        assert int((await partition_states(settings))[k]["outbox"]) >= 1
        assert "o-1" not in view.instances
        monkeypatch.setattr(PartitionRunner, "_publish_with_retry", real_publish)
        async with running_worker(settings):
            async with asyncio.timeout(15):
                change = await anext(changes)
        assert (change.kind, change.instance_id, change.revision) == (DeltaKind.ADDED, "o-1", 1)


async def test_watcher_whose_queue_was_deleted_recovers_the_exact_set(
    busreg_worker: Worker, busreg_namespace: Settings
) -> None:
    settings = busreg_namespace
    async with Registry(settings) as registrants, Registry(settings) as watcher:
        view = await watcher.watch("lossy", resync_interval=0.5)
        await registrants.register("lossy", address="127.0.0.1:1", instance_id="a")
        await view.wait_for(lambda i: set(i) == {"a"}, timeout=10)
        assert view._queue is not None
        # an exclusive queue can only be deleted through its own connection (or by an
        # operator with rabbitmqctl); the effect on the view is the same
        await view._channel.queue_delete(view._queue.name)
        b = await registrants.register("lossy", address="127.0.0.1:2", instance_id="b")
        await registrants.register("lossy", address="127.0.0.1:3", instance_id="c")
        await b.deregister()
        await view.wait_for(lambda i: set(i) == {"a", "c"}, timeout=15)
        snap = await watcher.snapshot("lossy")
        assert view.revision == snap.revision
        # and it is watching again: a later change arrives as a delta
        await registrants.register("lossy", address="127.0.0.1:4", instance_id="d")
        await view.wait_for(lambda i: set(i) == {"a", "c", "d"}, timeout=15)


async def test_watcher_resyncs_on_a_revision_gap(
    busreg_worker: Worker, busreg_namespace: Settings
) -> None:
    settings = busreg_namespace
    async with Registry(settings) as registrants, Registry(settings) as watcher:
        view = await watcher.watch("gappy", resync_interval=None)
        await registrants.register("gappy", address="127.0.0.1:1", instance_id="a")
        await view.wait_for(lambda i: "a" in i, timeout=10)
        resyncs = view.resyncs
        # a delta from the future: revision 5 when the view has 1 -> gap -> snapshot
        conn = await connect_amqp(settings, "forger")
        try:
            channel = await conn.channel()
            exchange = await channel.get_exchange(c.service_exchange(settings.namespace, "gappy"))
            import aio_pika
            import orjson

            inst = view.instances["a"].model_dump(mode="json") | {"instance_id": "ghost"}
            body = {
                "v": 1,
                "kind": "added",
                "service": "gappy",
                "epoch": view.epoch,
                "revision": 5,
                "instance": inst,
                "reason": None,
            }
            await exchange.publish(aio_pika.Message(orjson.dumps(body)), routing_key="added")
        finally:
            await conn.close()
        async with asyncio.timeout(10):
            while view.resyncs == resyncs:
                await view.wait_for(lambda i: True, timeout=10)
                await asyncio.sleep(0.01)  # resync counter has no event of its own
        assert set(view.instances) == {"a"}, "the forged delta beyond the gap was not applied"
        assert view.revision == 1


async def test_graceful_stop_hands_partitions_over_without_loss(
    busreg_namespace: Settings, tmp_path: Path
) -> None:
    settings = busreg_namespace
    first = spawn_worker(settings, "first", tmp_path / "first.log")
    try:
        await eventually(
            lambda: owners(settings),
            lambda o: all(v == "first" for v in o.values()),
            timeout=20,
            what="first owns everything",
        )
        second = spawn_worker(settings, "second", tmp_path / "second.log")
        try:
            await eventually(
                lambda: owners(settings),
                lambda o: sorted(map(str, o.values())) == ["first", "first", "second", "second"],
                timeout=20,
                what="rebalanced 2/2",
            )
            t0 = time.monotonic()
            stop_process(first, signal.SIGTERM)
            await eventually(
                lambda: owners(settings),
                lambda o: all(v == "second" for v in o.values()),
                timeout=20,
                what="second owns everything",
            )
            print(f"SIGTERM handover took {time.monotonic() - t0:.3f}s")
        finally:
            stop_process(second)
    finally:
        stop_process(first)
    assert first.returncode == 0


@pytest.mark.busreg(partitions=2)
async def test_a_handover_stuck_on_the_broker_is_cut_short_and_loses_nothing(
    busreg_namespace: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A runner whose delta confirms never come must not keep its partition from the
    worker it is handed to: after drain_timeout the handover is cut short, and the new
    owner publishes what the stuck one had committed to the outbox."""
    settings = busreg_namespace.model_copy(
        update={"worker": busreg_namespace.worker.model_copy(update={"drain_timeout": 1.0})}
    )
    # "a" sorts before "b": with both live, partition 1 is b's (k mod W over sorted ids)
    service = next(f"stuck{i}" for i in range(100) if partition_for(f"stuck{i}", 2) == 1)
    async with (
        running_worker(settings, worker_id="a"),
        Registry(settings) as registrants,
        Registry(settings) as watcher,
    ):
        view = await watcher.watch(service, resync_interval=None)
        await registrants.register(service, address="127.0.0.1:1", instance_id="before")
        await view.wait_for(lambda i: "before" in i, timeout=10)
        resyncs = view.resyncs  # the initial snapshot

        async def never_confirmed(self: DeltaPublisher, entries: list[bytes]) -> None:
            await asyncio.Event().wait()  # a broker that takes the publish, never confirms

        monkeypatch.setattr(DeltaPublisher, "publish", never_confirmed)
        await registrants.register(service, address="127.0.0.1:2", instance_id="during")
        await eventually(
            lambda: partition_states(settings),
            lambda s: int(s[1]["outbox"]) >= 1,
            timeout=10,
            what="the delta committed to the outbox, its publish stuck",
        )
        b = spawn_worker(settings, "b", tmp_path / "b.log")
        try:
            t0 = time.monotonic()
            await eventually(
                lambda: owners(settings),
                lambda o: o == {0: "a", 1: "b"},
                timeout=20,
                what="b owns partition 1 although a's runner is stuck",
            )
            took = time.monotonic() - t0
            # the new owner publishes what the stuck runner had committed
            await view.wait_for(lambda i: "during" in i, timeout=10)
            assert view.resyncs == resyncs, "the delta should arrive in order, not by a resync"
        finally:
            stop_process(b)
    assert "partition handover overran partition=1 worker=a" in caplog.text
    print(f"stuck handover cut short; b owned partition 1 after {took:.2f}s")
