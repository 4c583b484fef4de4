"""Bad input never stops a partition (invariant 6): a flood of garbage of every kind,
interleaved with valid traffic."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest
from rstream import RawMessage

from busreg import Registry, Settings, partition_for
from busreg import constants as c
from busreg.ops.deadletters import read_dead_letters
from busreg.server.worker import Worker
from busreg.transport.connections import stream_producer
from busreg.wire.codec import encode_event

from .fuzz import amqp_wrapped, garbage, valid
from .helpers import eventually, partition_states

pytestmark = pytest.mark.servers

SEED = 20261126
Flood = tuple[dict[int, list[bytes]], Counter[str], int, dict[int, list[str]]]


def _services(parts: int) -> dict[int, list[str]]:
    by_part: dict[int, list[str]] = {k: [] for k in range(parts)}
    n = 0
    while min(len(v) for v in by_part.values()) < 10:
        name = f"svc-{n}"
        by_part[partition_for(name, parts)].append(name)
        n += 1
    return {k: v[:10] for k, v in by_part.items()}


def _flood(parts: int) -> Flood:
    """~10,200 ingest messages over ``parts`` partitions, a third of them garbage; valid
    events are 34 in-order heartbeats of each of 100 instances per partition."""
    rng = random.Random(SEED)
    services = _services(parts)
    expected: Counter[str] = Counter()
    valid_count = 0
    per_partition: dict[int, list[bytes]] = {}
    for k, names in services.items():
        junk = garbage(rng, names[0], services[(k + 1) % parts][0])
        queues = [
            [valid(names[i % 10], f"i-{k}-{i}", seq) for seq in range(1, 35)] for i in range(100)
        ]
        out: list[bytes] = []
        while any(queues):
            if rng.random() < 1 / 3:
                body, reason = next(junk)
                if rng.random() < 0.2 and reason != "oversized":
                    body = amqp_wrapped(body)  # the same garbage via an AMQP publisher
                out.append(body)
                expected[reason] += 1
            else:
                queue = rng.choice([q for q in queues if q])
                out.append(encode_event(queue.pop(0)))
                valid_count += 1
        per_partition[k] = out
    return per_partition, expected, valid_count, services


@pytest.mark.busreg(partitions=2)
async def test_flood_with_a_third_garbage_applies_every_valid_event(
    busreg_worker: Worker, busreg_namespace: Settings
) -> None:
    settings = busreg_namespace
    runners_before = {k: o.runner for k, o in busreg_worker._owned.items()}
    # built off the event loop: the worker under test shares this process
    per_partition, expected, valid_count, services = await asyncio.to_thread(
        _flood, settings.partitions
    )
    total = sum(len(v) for v in per_partition.values())
    assert total >= 10_000
    assert 0.3 < sum(expected.values()) / total < 0.37
    assert set(expected) == {
        "malformed",
        "oversized",
        "unknown-version",
        "invalid",
        "wrong-partition",
    }

    producer = await stream_producer(settings, "flood")
    try:
        for k, bodies in per_partition.items():
            stream = c.ingest_partition(settings.namespace, k)
            for i in range(0, len(bodies), 500):
                await producer.send_batch(stream, [RawMessage(b) for b in bodies[i : i + 500]])
            await producer.send_wait(stream, RawMessage(b'{"v":1,"type":"tick","worker":"x"}'))
    finally:
        await producer.close()

    states = await eventually(
        lambda: partition_states(settings),
        # every message, up to each partition's closing tick, committed; and published
        lambda s: all(
            int(s[k].get("offset", -1)) >= len(bodies) and int(s[k]["outbox"]) == 0
            for k, bodies in per_partition.items()
        ),
        timeout=60,
        what="the flood to be applied and its dead letters published",
    )
    assert sum(int(x.get("applied", 0)) for x in states.values()) == valid_count
    assert sum(int(x.get("stale", 0)) for x in states.values()) == 0
    # the worker never restarted a partition
    assert {k: o.runner for k, o in busreg_worker._owned.items()} == runners_before
    by_reason: Counter[str] = Counter()
    for runner in runners_before.values():
        by_reason.update(runner.stats.dead_by_reason)
    assert by_reason == expected
    dead = sum(expected.values())
    # every dead letter reached the queue, with its reason
    queued, letters = await read_dead_letters(settings, limit=dead + 10, ack=True)
    assert len(letters) == dead, (queued, len(letters))
    assert Counter(x["reason"] for x in letters) == expected
    # and the valid traffic is all there, at its last heartbeat
    async with Registry(settings) as client:
        for names in services.values():
            for name in names:
                snap = await client.snapshot(name)
                assert len(snap.instances) == 10
                assert all(i.metadata == {"seq": "34"} for i in snap.instances)
    print(f"flood: {total} events, {valid_count} applied, {dead} dead-lettered {dict(by_reason)}")
