"""Batched heartbeats (contract v2): decoding, the worker's expansion into apply.lua groups,
the client's batches and its beat grid. Pure; the end-to-end path is in
tests/integration/test_batched_heartbeats.py."""

from __future__ import annotations

import asyncio
import doctest

import orjson
import pytest

from busreg import constants as c
from busreg.client import renewals
from busreg.client.renewals import BeatGrid, HeartbeatBatcher, _chunks
from busreg.errors import InvalidEvent, PublishFailed
from busreg.server.encoding import BatchEncoder
from busreg.server.stats import PartitionStats
from busreg.settings import AuthSettings, Settings
from busreg.wire.auth import service_key, sign
from busreg.wire.codec import decode_ingest, encode_event
from busreg.wire.models import Deregister, Heartbeat, Heartbeats
from busreg.wire.routing import partition_for

SECRET = "batch-test-secret"
P = 4


def _services_in(partition: int, n: int) -> list[str]:
    names = (f"svc{i}" for i in range(10_000))
    return [s for s in names if partition_for(s, P) == partition][:n]


def _beat(service: str, iid: str = "i-1", seq: int = 1) -> Heartbeat:
    return Heartbeat(
        service=service, instance_id=iid, incarnation=7, seq=seq, address="10.0.0.1:80"
    )


def _batch(*items: bytes) -> bytes:
    return orjson.dumps({"v": 2, "type": "heartbeats", "items": [i.decode() for i in items]})


def test_doctests() -> None:
    assert doctest.testmod(renewals).failed == 0


def test_a_batch_decodes_as_v2_and_other_versions_are_refused() -> None:
    decoded = decode_ingest(_batch(encode_event(_beat("a")), encode_event(_beat("b"))))
    assert isinstance(decoded.event, Heartbeats)
    assert len(decoded.event.items) == 2
    with pytest.raises(InvalidEvent) as info:
        decode_ingest(b'{"v":3,"type":"heartbeats","items":["x"]}')
    assert info.value.reason == "unknown-version"
    assert "v=1 and v=2" in info.value.detail
    with pytest.raises(InvalidEvent) as info:
        decode_ingest(b'{"v":1,"type":"heartbeats","items":["x"]}')  # batches are v2 only
    assert info.value.reason == "invalid"


def test_only_a_batch_may_exceed_the_single_event_limit() -> None:
    big = encode_event(_beat("a")).replace(
        b'"metadata":{}', b'"metadata":{"k":"' + b"x" * 1000 + b'"}'
    )
    items = [big] * 20  # ~25 KB: above MAX_EVENT_BYTES, fine for a batch
    assert len(_batch(*items)) > c.MAX_EVENT_BYTES
    assert isinstance(decode_ingest(_batch(*items)).event, Heartbeats)
    with pytest.raises(InvalidEvent) as info:
        decode_ingest(b'{"v":1,"type":"tick","worker":"' + b"x" * c.MAX_EVENT_BYTES + b'"}')
    assert info.value.reason == "oversized"


def test_the_worker_expands_a_batch_and_refuses_bad_items_alone() -> None:
    settings = Settings(
        namespace="b",
        partitions=P,
        auth=AuthSettings(mode="enforce", secret=SECRET),
    )
    stats = PartitionStats()
    encoder = BatchEncoder(settings, 1, stats)
    mine = _services_in(1, 2)
    other = _services_in(2, 1)[0]
    key = {s: service_key(SECRET.encode(), s) for s in [*mine, other]}
    good = [sign(key[s], encode_event(_beat(s))) for s in mine]
    forged = sign(key[mine[0]], encode_event(_beat(mine[1], "forged")))  # another's key
    elsewhere = sign(key[other], encode_event(_beat(other)))  # another partition's service
    leaving = sign(
        key[mine[0]],
        encode_event(Deregister(service=mine[0], instance_id="i-1", incarnation=7, seq=2)),
    )
    args = encoder.encode([(100, 5_000, _batch(*good, forged, elsewhere, leaving))])
    groups = [tuple(args[i : i + 8]) for i in range(0, len(args), 8)]
    assert [g[2] for g in groups] == ["B", "u", "u", "x", "x", "x"]
    assert groups[0][:3] == (100, 5_000, "B")
    assert [g[3] for g in groups[1:3]] == mine
    assert stats.dead_by_reason == {"unauthorised": 1, "wrong-partition": 1, "invalid": 1}
    # a refused item's dead letter names the batch's offset and keeps the item itself
    letter = orjson.loads(groups[3][7].split(c.FIELD_SEPARATOR, 2)[2])
    assert letter["offset"] == 100
    assert letter["reason"] == "unauthorised"


def test_client_batches_stay_within_the_limits() -> None:
    body = encode_event(_beat("a"))
    chunks = _chunks([body] * (c.MAX_BATCH_ITEMS + 3))
    assert [len(ch) for ch in chunks] == [c.MAX_BATCH_ITEMS, 3]
    huge = body.replace(b'"metadata":{}', b'"metadata":{"k":"' + b"x" * 10_000 + b'"}')
    chunks = _chunks([huge] * 40)
    assert all(len(_batch(*ch)) <= c.MAX_BATCH_BYTES for ch in chunks)
    assert sum(len(ch) for ch in chunks) == 40


def test_the_grid_keeps_one_phase_whatever_the_interval() -> None:
    grid = BeatGrid(phase=0.5)
    assert grid.next_after(3.2, 1.0) == 3.5
    assert grid.next_after(3.5, 1.0) == 4.5
    assert grid.next_after(3.2, 0.4) == pytest.approx(3.4)


class _Writer:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.fail = fail

    async def send(self, stream: str, body: bytes, timeout: float) -> None:
        await asyncio.sleep(0)
        if self.fail:
            raise PublishFailed("no confirm")
        self.sent.append((stream, body))


async def test_heartbeats_sent_together_go_out_as_one_event_per_stream() -> None:
    writer = _Writer()
    batcher = HeartbeatBatcher(writer)
    bodies = [encode_event(_beat("a", f"i-{n}")) for n in range(5)]
    await asyncio.gather(
        *(batcher.send("s-0", b, 1.0) for b in bodies), batcher.send("s-1", bodies[0], 1.0)
    )
    by_stream = dict(writer.sent)
    assert set(by_stream) == {"s-0", "s-1"}
    batch = orjson.loads(by_stream["s-0"])
    assert batch["v"] == 2
    assert [i.encode() for i in batch["items"]] == bodies
    assert by_stream["s-1"] == bodies[0]  # alone: the plain heartbeat
    assert (batcher.batches, batcher.items) == (1, 6)


async def test_a_failed_batch_fails_every_heartbeat_in_it() -> None:
    batcher = HeartbeatBatcher(_Writer(fail=True))
    body = encode_event(_beat("a"))
    results = await asyncio.gather(
        *(batcher.send("s-0", body, 1.0) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, PublishFailed) for r in results)


async def test_a_cancelled_leader_fails_its_joiners_instead_of_leaving_them_waiting() -> None:
    batcher = HeartbeatBatcher(_Writer(), linger=10.0)
    body = encode_event(_beat("a"))
    leader = asyncio.create_task(batcher.send("s-0", body, 1.0))
    await asyncio.sleep(0)
    joiner = asyncio.create_task(batcher.send("s-0", body, 1.0))
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(PublishFailed):
        async with asyncio.timeout(1):
            await joiner
    # and the next heartbeat starts a new batch
    batcher._linger = 0.0
    await batcher.send("s-0", body, 1.0)
