"""apply.lua on a real Redis, driven directly with synthetic broker timestamps.

No worker and no broker: each test acquires a partition lease, calls
``PartitionStore.apply`` with events encoded like ``BatchEncoder.encode`` (8 args each:
offset, broker ts, op, service, instance id, version, ttl ms, payload) and reads the
partition back (state hash, snapshot, tombstones, outbox). Every row names the invariant of
docs/design.md it pins: 2 exactly-once effect (versions, tombstones, offsets), 4 no false
expiry (watermark clock, clamp, outage grace), 5 revisions.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio

from busreg.errors import Fenced
from busreg.server.store import ApplyResult, Lease, PartitionStore
from busreg.settings import Settings
from busreg.testing import BusregServers
from busreg.transport.connections import connect_redis
from busreg.wire.codec import encode_stored
from busreg.wire.models import Heartbeat, InstanceStatus

pytestmark = pytest.mark.servers

P = 0  # every test uses partition 0 of its own namespace
SVC = "apply-svc"
US = b"\x1f"
T = 1_700_000_000_000  # a realistic broker timestamp (ms)
MAX_STEP = 1_000
TOMB_MS = 10_000
GRACE_MS = 5_000
#: the per-call caps of apply.lua (ZRANGEBYSCORE ... LIMIT 0 1000 / LIMIT 0 500)
EXPIRY_CAP = 1_000
TOMB_CAP = 500

Event = tuple[Any, ...]


# --- events, encoded as BatchEncoder.encode does --------------------------------------


def _version(inc: int, seq: int) -> str:
    return f"{inc:020d}{seq:016d}"  # "%020d%016d", as the runner


def _payload(
    iid: str, inc: int, seq: int, ttl_ms: int, status: InstanceStatus, service: str = SVC
) -> str:
    event = Heartbeat(
        service=service,
        instance_id=iid,
        incarnation=inc,
        seq=seq,
        address="10.0.0.1:8080",
        status=status,
        ttl=ttl_ms / 1000,
    )
    return encode_stored(event)


def up(
    off: int,
    ts: int,
    iid: str,
    *,
    inc: int = 1,
    seq: int = 1,
    ttl_ms: int = 3_000,
    status: InstanceStatus = InstanceStatus.UP,
) -> Event:
    """Register/heartbeat ('U')."""
    payload = _payload(iid, inc, seq, ttl_ms, status)
    return (off, ts, "U", SVC, iid, _version(inc, seq), ttl_ms, payload)


def down(off: int, ts: int, iid: str, *, inc: int = 1, seq: int = 1) -> Event:
    """Deregister ('D')."""
    return (off, ts, "D", SVC, iid, _version(inc, seq), 0, "")


def tick(off: int, ts: int) -> Event:
    """Tick ('N' without dead letter): only moves offset and clock."""
    return (off, ts, "N", "", "", "", 0, "")


def mark(off: int, ts: int) -> Event:
    """Outage mark ('G'): a tick from a worker that lost its way to the stream."""
    return (off, ts, "G", "", "", "", 0, "")


# --- one partition, read back ---------------------------------------------------------------


@pytest_asyncio.fixture
async def store(busreg_servers: BusregServers) -> AsyncIterator[PartitionStore]:
    """A PartitionStore on a fresh namespace; all its keys are deleted afterwards."""
    redis = await connect_redis(Settings(redis_url=busreg_servers.redis_url))
    st = PartitionStore(redis, f"t{uuid.uuid4().hex[:10]}")
    try:
        yield st
    finally:
        try:
            await st.purge(1)
            left = [k async for k in redis.scan_iter(match=f"*{st.namespace}*")]
            assert left == [], left
        finally:
            await redis.aclose()


async def _lease(store: PartitionStore, worker: str = "w-test") -> Lease:
    lease = await store.acquire(P, worker, 60_000)
    assert lease is not None
    return lease


async def _apply(store: PartitionStore, lease: Lease, events: list[Event]) -> ApplyResult:
    args = [a for ev in events for a in ev]
    return await store.apply(lease, args, MAX_STEP, TOMB_MS, GRACE_MS)


async def _outbox(store: PartitionStore) -> list[tuple[str, int, str | None, str]]:
    """The outbox as (kind, revision, reason, instance id), checking each entry's framing."""
    raw = await store.redis.lrange(store.prefix(P) + "outbox", 0, -1)
    out = []
    for entry in raw:
        exchange, kind, body = entry.split(US, 2)
        delta = json.loads(body)
        assert exchange.decode() == f"{store.namespace}.svc.{SVC}"
        assert delta["kind"] == kind.decode()
        assert delta["service"] == SVC
        assert delta["instance"]["service"] == SVC
        iid = delta["instance"]["instance_id"]
        out.append((delta["kind"], delta["revision"], delta["reason"], iid))
    return out


async def _tombs(store: PartitionStore) -> set[str]:
    fields = await store.redis.hkeys(store.prefix(P) + "tomb")
    return {f.split(US, 1)[1].decode() for f in fields}


# --- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One apply call and what must hold after it (None: not checked)."""

    events: list[Event]
    note: str = ""
    result: dict[str, int] = field(default_factory=dict)  # subset of ApplyResult's fields
    clock: int | None = None
    last_ts: int | None = None
    grace_until: int | None = None
    live: set[str] | None = None  # instance ids in the snapshot
    revision: int | None = None
    tombs: set[str] | None = None
    counters: dict[str, int] | None = None  # cumulative counters in the state hash
    # the whole outbox so far: (kind, revision, reason, instance id)
    outbox: list[tuple[str, int, str | None, str]] | None = None


def S(*events: Event, **expect: Any) -> Step:
    return Step(list(events), **expect)


@dataclass(frozen=True)
class Row:
    invariant: str
    steps: list[Step]


ROWS: dict[str, Row] = {
    "clock-clamp": Row(
        "4 no false expiry: a jump in broker time larger than max_step (nobody could write) "
        "advances the partition clock by at most max_step, each jump on its own",
        [
            S(
                up(0, T, "a"),
                note="first event sets clock = last_ts = ts",
                result={"applied": 1, "changes": 1},
                clock=T,
                last_ts=T,
                live={"a"},
            ),
            S(
                tick(1, T + 60_000),
                note="60 s gap > ttl: clamped to 1 s, nothing expires",
                result={"expired": 0},
                clock=T + 1_000,
                last_ts=T + 60_000,
                grace_until=T + 1_000 + GRACE_MS,
                live={"a"},
            ),
            S(
                tick(2, T + 60_400),
                note="a normal step is taken in full",
                clock=T + 1_400,
                last_ts=T + 60_400,
                grace_until=T + 6_000,
            ),
            S(
                tick(3, T + 61_400),
                note="exactly max_step: not clamped, no new grace",
                clock=T + 2_400,
                grace_until=T + 6_000,
            ),
            S(
                tick(4, T + 200_000),
                tick(5, T + 400_000),
                note="two jumps in one batch",
                clock=T + 4_400,
                last_ts=T + 400_000,
                grace_until=T + 4_400 + GRACE_MS,
                result={"expired": 0, "offset": 5},
                live={"a"},
            ),
        ],
    ),
    "outage-grace": Row(
        "4 no false expiry: after a gap > max_step nothing expires until the clock passes "
        "grace_until (clock + step + grace); instances that heartbeat in the grace survive, "
        "the others expire once it is over",
        [
            S(up(0, T, "a"), up(1, T, "b"), live={"a", "b"}),  # deadlines T + 3000
            S(
                tick(2, T + 600_000),
                note="10 min outage",
                clock=T + 1_000,
                grace_until=T + 6_000,
                result={"expired": 0},
            ),
            S(
                tick(3, T + 601_000),
                tick(4, T + 602_000),
                tick(5, T + 603_000),
                note="past both deadlines, but in the grace",
                clock=T + 4_000,
                result={"expired": 0},
                live={"a", "b"},
            ),
            S(
                up(6, T + 604_000, "b", seq=2),
                note="b reconnects: deadline T + 8000",
                clock=T + 5_000,
                result={"expired": 0, "applied": 1},
                live={"a", "b"},
            ),
            S(
                tick(7, T + 604_999),
                note="grace_until - 1",
                clock=T + 5_999,
                result={"expired": 0},
                live={"a", "b"},
            ),
            S(
                tick(8, T + 605_001),
                note="grace over: a expires, b does not",
                clock=T + 6_001,
                result={"expired": 1, "changes": 1},
                live={"b"},
                outbox=[
                    ("added", 1, None, "a"),
                    ("added", 2, None, "b"),
                    ("removed", 3, "expired", "a"),
                ],
            ),
            S(
                tick(9, T + 606_000),
                tick(10, T + 607_000),
                note="b's deadline reached, not passed",
                clock=T + 8_000,
                grace_until=T + 6_000,
                result={"expired": 0},
                live={"b"},
            ),
            S(tick(11, T + 607_001), result={"expired": 1}, live=set(), revision=4),
        ],
    ),
    "gap-without-leases": Row(
        "4 (both ways): a gap, or an outage mark, while the partition has no live lease opens "
        "no grace: no instance missed a renewal. A grace opened then held back the expiry of "
        "instances registered just after a worker start (test_takeover_expiry saw 9.5 s)",
        [
            S(
                tick(0, T),
                tick(1, T + 5_000),
                note="5 s gap, nothing registered",
                clock=T + 1_000,
                grace_until=0,
                result={"expired": 0},
            ),
            S(
                mark(2, T + 5_100),
                note="an outage mark, nothing registered",
                clock=T + 1_100,
                grace_until=0,
            ),
            S(up(3, T + 5_200, "a"), note="clock T + 1,200: deadline T + 4,200", live={"a"}),
            S(
                tick(4, T + 6_200),
                tick(5, T + 7_200),
                tick(6, T + 8_100),
                tick(7, T + 8_201),
                note="past its deadline: expired, no grace in the way",
                clock=T + 4_201,
                result={"expired": 1},
                live=set(),
                outbox=[("added", 1, None, "a"), ("removed", 2, "expired", "a")],
            ),
            S(
                up(8, T + 8_300, "b"),
                tick(9, T + 10_000),
                note="with b live, a gap opens one",
                clock=T + 5_300,
                grace_until=T + 4_300 + 1_000 + GRACE_MS,
            ),
        ],
    ),
    "outage-mark": Row(
        "4 no false expiry: an outage mark (a worker lost its way to the stream: its leader "
        "moved) opens the grace from the clock where it lands, with no gap in the clock: "
        "writers that have not found the new leader yet keep their instances; marks never "
        "shorten a grace, and expiry resumes once the grace is over",
        [
            S(up(0, T, "a"), up(1, T, "b"), live={"a", "b"}),  # deadlines T + 3000
            S(
                tick(2, T + 500),
                mark(3, T + 600),
                note="the leader moved at T + 600",
                clock=T + 600,
                grace_until=T + 600 + GRACE_MS,
                counters={"outage_marks": 1},
            ),
            S(
                mark(4, T + 700),
                note="a second worker's mark: the later grace wins",
                grace_until=T + 700 + GRACE_MS,
                counters={"outage_marks": 2},
            ),
            S(
                *(tick(5 + k, T + 700 + 1_000 * (k + 1)) for k in range(4)),
                note="ticks go on, max_step apart: no gap, a's deadline passes in the grace",
                clock=T + 4_700,
                grace_until=T + 5_700,
                result={"expired": 0},
                live={"a", "b"},
            ),
            S(
                up(9, T + 5_100, "b", seq=2),
                note="b found the new leader: deadline T + 8100",
                result={"expired": 0, "applied": 1},
                live={"a", "b"},
            ),
            S(
                tick(10, T + 5_699),
                note="grace_until - 1",
                clock=T + 5_699,
                result={"expired": 0},
                live={"a", "b"},
            ),
            S(
                tick(11, T + 5_701),
                note="grace over: a (silent since T) expires",
                result={"expired": 1},
                live={"b"},
            ),
        ],
    ),
    "clock-backwards": Row(
        "4 no false expiry: broker timestamps going backwards neither move the clock back "
        "nor forward, expire nothing, and the next forward step counts from the newest ts",
        [
            S(up(0, T, "a")),  # deadline T + 3000
            S(
                tick(1, T + 1_000),
                tick(2, T + 2_000),
                tick(3, T + 2_500),
                clock=T + 2_500,
                last_ts=T + 2_500,
                grace_until=0,
            ),
            S(
                tick(4, T - 100_000),
                tick(5, T + 1_000),
                note="backwards",
                clock=T + 2_500,
                last_ts=T + 2_500,
                grace_until=0,
                result={"expired": 0, "offset": 5},
                live={"a"},
            ),
            S(
                tick(6, T + 2_600),
                note="100 ms after the newest ts, not 1.6 s after the last",
                clock=T + 2_600,
                last_ts=T + 2_600,
                grace_until=0,
                live={"a"},
            ),
            S(tick(7, T + 3_000), clock=T + 3_000, result={"expired": 0}, live={"a"}),
            S(tick(8, T + 3_001), clock=T + 3_001, result={"expired": 1}, live=set()),
        ],
    ),
    "expiry-at-ttl-and-revisions": Row(
        "4 + 5: an instance expires only once the partition clock (moved by ticks) has passed "
        "clock-at-last-renewal + ttl; the revision grows by one per visible change (a no-op "
        "heartbeat is none) and the outbox gets added / modified / removed(expired)",
        [
            S(
                up(0, T, "a", seq=1),
                result={"applied": 1, "changes": 1, "outbox": 1},
                revision=1,
                live={"a"},
                outbox=[("added", 1, None, "a")],
            ),
            S(
                up(1, T + 500, "a", seq=2),
                note="no-op heartbeat: deadline T + 3500, no delta",
                result={"applied": 1, "changes": 0, "outbox": 1},
                revision=1,
            ),
            S(
                up(2, T + 1_000, "a", seq=3, status=InstanceStatus.DOWN),
                note="status change: modified, deadline T + 4000",
                result={"applied": 1, "changes": 1},
                revision=2,
            ),
            S(
                tick(3, T + 2_000),
                tick(4, T + 3_000),
                tick(5, T + 4_000),
                note="clock == deadline: not yet",
                clock=T + 4_000,
                result={"expired": 0, "changes": 0},
                live={"a"},
                revision=2,
            ),
            S(
                tick(6, T + 4_001),
                clock=T + 4_001,
                result={"expired": 1, "changes": 1, "outbox": 3},
                live=set(),
                revision=3,
                tombs={"a"},
                counters={"applied": 3, "expired": 1},
                outbox=[
                    ("added", 1, None, "a"),
                    ("modified", 2, None, "a"),
                    ("removed", 3, "expired", "a"),
                ],
            ),
        ],
    ),
    "tombstone-blocks-late-heartbeat": Row(
        "2 exactly-once effect: after a deregister, a late heartbeat with an older (or the "
        "same) version does not revive the instance; after tombstone_ms of partition clock "
        "the tombstone is forgotten (and such a heartbeat would be applied again)",
        [
            S(up(0, T, "a", seq=5, ttl_ms=60_000), live={"a"}),
            S(
                down(1, T + 100, "a", seq=6),
                note="tombstone, forget at T + 100 + TOMB_MS",
                result={"applied": 1, "changes": 1},
                live=set(),
                tombs={"a"},
                revision=2,
                outbox=[("added", 1, None, "a"), ("removed", 2, "deregistered", "a")],
            ),
            S(
                up(2, T + 200, "a", seq=5, ttl_ms=60_000),
                up(3, T + 300, "a", seq=6),
                down(4, T + 300, "a", seq=6),
                note="late/duplicate events of the old run",
                result={"applied": 0, "stale": 3, "changes": 0},
                live=set(),
                tombs={"a"},
                revision=2,
            ),
            S(
                *(tick(4 + k, T + 100 + 1_000 * k) for k in range(1, 10)),
                tick(14, T + 10_099),
                note="1 ms before the forget time",
                clock=T + 10_099,
                tombs={"a"},
            ),
            S(tick(15, T + 10_100), note="forgotten", clock=T + 10_100, tombs=set()),
            S(
                up(16, T + 10_200, "a", seq=5, ttl_ms=60_000),
                note="without its tombstone an old heartbeat registers again",
                result={"applied": 1, "changes": 1},
                live={"a"},
                revision=3,
            ),
        ],
    ),
    "tombstone-of-unknown-instance": Row(
        "2 exactly-once effect: a deregister of an unknown instance is stale but leaves a "
        "tombstone, so older heartbeats (lower seq or older incarnation) stay out; a newer "
        "one re-adds the instance and clears the tombstone",
        [
            S(
                down(0, T, "x", inc=2, seq=3),
                result={"stale": 1, "applied": 0, "changes": 0},
                live=set(),
                tombs={"x"},
                revision=0,
            ),
            S(
                up(1, T + 10, "x", inc=2, seq=2),
                up(2, T + 20, "x", inc=1, seq=99),
                up(3, T + 30, "x", inc=2, seq=3),
                result={"stale": 3, "changes": 0},
                live=set(),
                tombs={"x"},
            ),
            S(
                up(4, T + 40, "x", inc=2, seq=4),
                result={"applied": 1, "changes": 1},
                live={"x"},
                tombs=set(),
                revision=1,
            ),
            S(
                down(5, T + 50, "x", inc=2, seq=4),
                note="same version as stored: stale",
                result={"stale": 1, "applied": 0, "changes": 0},
                live={"x"},
                tombs=set(),
            ),
        ],
    ),
    "stale-and-replayed": Row(
        "2 exactly-once effect: duplicate and older versions are stale (no effect); events "
        "at or below the committed offset are skipped as replayed, whatever they carry, "
        "and do not move the clock",
        [
            S(up(0, T, "a", seq=2), result={"offset": 0, "applied": 1}, revision=1),
            S(
                up(1, T + 10, "a", seq=2),
                up(2, T + 20, "a", seq=1),
                up(3, T + 30, "a", inc=0, seq=9),
                note="duplicate, older seq, older incarnation",
                result={"offset": 3, "applied": 0, "stale": 3, "changes": 0, "replayed": 0},
                clock=T + 30,
                revision=1,
            ),
            S(
                up(0, T + 999_999, "a", seq=7),
                up(2, T + 999_999, "a", seq=7),
                up(3, T + 999_999, "a", seq=7, status=InstanceStatus.DOWN),
                note="replay of committed offsets, even with newer versions",
                result={"offset": 3, "replayed": 3, "applied": 0, "stale": 0, "changes": 0},
                clock=T + 30,
                last_ts=T + 30,
                revision=1,
            ),
            S(
                up(3, T + 40, "a", seq=8),
                up(4, T + 50, "a", seq=8, status=InstanceStatus.DOWN),
                note="mixed batch: 3 replayed, 4 applied",
                result={"offset": 4, "replayed": 1, "applied": 1, "changes": 1},
                clock=T + 50,
                revision=2,
            ),
            S(tick(10, T + 60), result={"offset": 10, "replayed": 0}),
            S(
                tick(7, T + 70),
                note="a gap below the offset is still replayed",
                result={"offset": 10, "replayed": 1},
                clock=T + 60,
                counters={"applied": 2, "stale": 3, "replayed": 5},
            ),
        ],
    ),
}


@pytest.mark.parametrize("name", list(ROWS))
async def test_apply_table(store: PartitionStore, name: str) -> None:
    """Each row: a sequence of apply calls on one partition and the state after each."""
    row = ROWS[name]
    lease = await _lease(store)
    for i, step in enumerate(row.steps):
        where = f"{name} step {i} ({step.note}) -- invariant {row.invariant}"
        res = await _apply(store, lease, step.events)
        for key, want in step.result.items():
            assert getattr(res, key) == want, f"{key}: {res} {where}"
        state = await store.partition_state(P)
        assert state["fence"] == lease.token
        assert int(state["offset"]) == res.offset, where
        assert int(state["outbox"]) == res.outbox, where
        if step.clock is not None:
            assert int(state["clock"]) == step.clock, f"clock {state} {where}"
        if step.last_ts is not None:
            assert int(state["last_ts"]) == step.last_ts, f"last_ts {state} {where}"
        if step.grace_until is not None:
            assert int(state["grace_until"]) == step.grace_until, f"grace {state} {where}"
        for key, want in (step.counters or {}).items():
            assert int(state.get(key, 0)) == want, f"{key} {state} {where}"
        snap = await store.snapshot(P, SVC)
        assert snap.epoch == lease.epoch
        if step.live is not None:
            assert {i.instance_id for i in snap.instances} == step.live, where
            deadlines = await store.redis.zrange(store.prefix(P) + "deadlines", 0, -1)
            assert {d.split(US, 1)[1].decode() for d in deadlines} == step.live, where
        if step.revision is not None:
            assert snap.revision == step.revision, where
        if step.tombs is not None:
            assert await _tombs(store) == step.tombs, where
            assert await store.redis.zcard(store.prefix(P) + "tombdl") == len(step.tombs)
        if step.outbox is not None:
            assert await _outbox(store) == step.outbox, where


# --- per-call caps --------------------------------------------------------------------------


async def test_expiry_and_tombstone_caps_per_call(store: PartitionStore) -> None:
    """4 (+2): one apply call expires at most 1000 instances and forgets at most 500
    tombstones; the rest go in the next calls (ticks keep them coming)."""
    n = 1_200
    lease = await _lease(store)
    payload = _payload("x", 1, 1, 3_000, InstanceStatus.UP)  # has no instance id: shared
    events = [(o, T, "U", SVC, f"i{o:04d}", _version(1, 1), 3_000, payload) for o in range(n)]
    res = await _apply(store, lease, events)
    assert (res.applied, res.changes, res.outbox) == (n, n, n)

    key = store.prefix(P)
    res = await _apply(
        store,
        lease,
        [tick(n + k, T + 1_000 * (k + 1)) for k in range(3)] + [tick(n + 3, T + 3_001)],
    )
    assert res.expired == EXPIRY_CAP
    assert await store.redis.hlen(key + "s:" + SVC) == n - EXPIRY_CAP
    assert await store.redis.zcard(key + "deadlines") == n - EXPIRY_CAP
    assert await store.redis.hlen(key + "tomb") == EXPIRY_CAP

    res = await _apply(store, lease, [tick(n + 4, T + 3_002)])
    assert res.expired == n - EXPIRY_CAP
    assert await store.redis.hlen(key + "s:" + SVC) == 0
    assert await store.redis.hlen(key + "tomb") == n
    snap = await store.snapshot(P, SVC)
    assert (snap.revision, snap.instances) == (2 * n, [])
    assert res.outbox == 2 * n

    # tombstones: forget times T + 3001 + TOMB_MS (1000 of them) and T + 3002 + TOMB_MS
    ticks = [tick(n + 5 + k, T + 3_002 + 1_000 * (k + 1)) for k in range(TOMB_MS // 1_000)]
    await _apply(store, lease, ticks)
    state = await store.partition_state(P)
    assert int(state["clock"]) == T + 3_002 + TOMB_MS
    assert await store.redis.hlen(key + "tomb") == n - TOMB_CAP
    off = n + 5 + len(ticks)
    await _apply(store, lease, [tick(off, T + 3_002 + TOMB_MS + 1)])
    assert await store.redis.hlen(key + "tomb") == n - 2 * TOMB_CAP
    assert await store.redis.zcard(key + "tombdl") == n - 2 * TOMB_CAP
    await _apply(store, lease, [tick(off + 1, T + 3_002 + TOMB_MS + 2)])
    assert await store.redis.hlen(key + "tomb") == 0
    assert await store.redis.zcard(key + "tombdl") == 0
    assert int((await store.partition_state(P))["expired"]) == n


# --- fencing --------------------------------------------------------------------------------


async def _dump(store: PartitionStore) -> dict[bytes, bytes | None]:
    keys = [k async for k in store.redis.scan_iter(match=store.prefix(P) + "*")]
    return {k: await store.redis.dump(k) for k in sorted(keys)}


async def test_wrong_fencing_token_raises_fenced_and_writes_nothing(
    store: PartitionStore,
) -> None:
    """3 one writer (and so 2): a batch with a token that is not the partition's current
    fence raises Fenced, and no key of the partition changes (state, offset, clock,
    instances, tombstones, revisions, outbox)."""
    old = await _lease(store, "w1")
    await _apply(store, old, [up(0, T, "a"), down(1, T + 10, "b")])
    new = await _lease(store, "w1")  # re-acquired: a new token, the old one is stale
    assert new.token != old.token
    assert (new.epoch, new.offset) == (old.epoch, 1)
    assert await store.acquire(P, "w2", 60_000) is None  # held by w1

    before = await _dump(store)
    batch = [up(2, T + 5_000, "c"), down(3, T + 5_000, "a", seq=2), tick(4, T + 9_000)]
    forged = Lease(P, old.epoch + "/999", old.epoch, old.offset, "w1|forged")
    for lease in (old, forged):
        with pytest.raises(Fenced):
            await _apply(store, lease, batch)
        with pytest.raises(Fenced):
            await _apply(store, lease, [])
        assert await _dump(store) == before

    res = await _apply(store, new, batch)  # the current token writes
    assert (res.offset, res.applied) == (4, 2)
    assert {i.instance_id for i in (await store.snapshot(P, SVC)).instances} == {"c"}


async def test_rebuild_replays_history_quietly_then_announces_the_caught_up_state(
    store: PartitionStore,
) -> None:
    """Invariants 4 and 5 after a Redis data loss: replaying the stream's history must not
    announce transitions that happened long ago (an instance dead for minutes announced
    ``added`` again), and no snapshot may be served from a half-rebuilt partition. Before,
    the replay published every past transition as new deltas and snapshots showed
    whatever the replay had reached."""
    lease = await _lease(store)  # fresh state: acquire marks it for a rebuild
    assert (await store.snapshot(P, SVC)).rebuilding
    history = [
        up(0, T, "gone", ttl_ms=1_000),  # expires during the replay
        up(1, T + 100, "left"),
        down(2, T + 200, "left", seq=2),  # deregistered during the replay
        up(3, T + 300, "live"),
    ]
    history += [tick(4 + i, T + 400 + i * 500) for i in range(4)]  # 1.9 s of clock
    head = 7  # the stream's head when the rebuild began
    args = [a for ev in history[:5] for a in ev]
    await store.apply(lease, args, MAX_STEP, TOMB_MS, GRACE_MS, rebuild_until=head)
    assert await _outbox(store) == []  # history announces nothing
    snap = await store.snapshot(P, SVC)
    assert snap.rebuilding
    assert snap.revision == 0
    args = [a for ev in history[5:] for a in ev]
    await store.apply(lease, args, MAX_STEP, TOMB_MS, GRACE_MS, rebuild_until=head)
    # caught up: the state it arrived at, once, as the new epoch's first revisions
    assert await _outbox(store) == [("added", 1, None, "live")]
    snap = await store.snapshot(P, SVC)
    assert not snap.rebuilding
    assert (snap.revision, [i.instance_id for i in snap.instances]) == (1, ["live"])
    # and from then on deltas as usual
    await _apply(store, lease, [down(8, T + 2_000, "live", seq=2)])
    assert (await _outbox(store))[-1] == ("removed", 2, "deregistered", "live")


async def test_a_fresh_partition_with_an_empty_stream_rebuilds_nothing(
    store: PartitionStore,
) -> None:
    """A first start (nothing in the stream: head -1) announces from the first event."""
    lease = await _lease(store)
    await store.apply(lease, list(up(0, T, "a")), MAX_STEP, TOMB_MS, GRACE_MS)
    assert await _outbox(store) == [("added", 1, None, "a")]
    assert not (await store.snapshot(P, SVC)).rebuilding


# --- services a new owner never named (Redis Cluster: declared keys only) ---------------


def _up_in(service: str, off: int, ts: int, iid: str, ttl_ms: int) -> Event:
    payload = _payload(iid, 1, 1, ttl_ms, InstanceStatus.UP, service)
    return (off, ts, "U", service, iid, _version(1, 1), ttl_ms, payload)


async def _last_deltas(store: PartitionStore, n: int) -> list[tuple[str, str, str | None]]:
    raw = await store.redis.lrange(store.prefix(P) + "outbox", -n, -1)
    out = []
    for entry in raw:
        delta = json.loads(entry.split(US, 2)[2])
        out.append((delta["kind"], delta["instance"]["instance_id"], delta["reason"]))
    return out


async def test_a_new_owner_expires_and_announces_services_it_never_named(
    store: PartitionStore,
) -> None:
    """Redis Cluster guarantees only the keys a script declares, so apply.lua touches a
    service's hash only if the caller named it: the batch's services and those the store
    learnt. A worker that just took a partition over has learnt none. Its ticks must
    still expire instances of every service (invariant 4: expiry at the lease, not one
    batch of that service later), and after a failover the new epoch must announce every
    live instance (invariant 5), whatever services the batch names."""
    first = await _lease(store, "w1")
    await _apply(
        store,
        first,
        [
            _up_in("svc-x", 0, T, "x", 1_000),
            _up_in("svc-y", 1, T, "y", 9_000),
            _up_in("svc-z", 2, T, "z", 9_000),
        ],
    )
    await store.release(first)

    takeover = PartitionStore(store.redis, store.namespace)  # knows no service yet
    lease = await takeover.acquire(P, "w2", 60_000)
    assert lease is not None
    ticks = [*tick(3, T + 800), *tick(4, T + 1_600)]  # steps within max_step: no grace
    res = await takeover.apply(lease, ticks, MAX_STEP, TOMB_MS, GRACE_MS)
    assert (res.offset, res.expired, res.changes) == (4, 1, 1)
    assert await _last_deltas(store, 1) == [("removed", "x", "expired")]
    await takeover.release(lease)

    # a promoted replica: the primary that wrote the state is not the one answering now
    await store.redis.hset(store.prefix(P) + "state", "replid", "f" * 40)
    after = PartitionStore(store.redis, store.namespace)
    lease = await after.acquire(P, "w3", 60_000)
    assert lease is not None
    res = await after.apply(lease, list(tick(5, T + 1_700)), MAX_STEP, TOMB_MS, GRACE_MS)
    assert (res.offset, res.changes) == (5, 2)
    assert await _last_deltas(store, 2) == [("added", "y", None), ("added", "z", None)]
    state = await store.partition_state(P)
    assert state["epoch"].startswith("r")
    assert state["epoch"] != lease.epoch
    rows = await PartitionStore(store.redis, store.namespace).services(P)
    assert {(r.service, r.revision, r.instances) for r in rows} == {
        ("svc-y", 1, 1),
        ("svc-z", 1, 1),
    }


# --- operator status overrides (op O) ---------------------------------------------------


def override(
    off: int, ts: int, iid: str, status: str, *, by: str = "alice", reason: str = "drain"
) -> Event:
    """An operator's status override ('O'); status '' clears it. Encoded as BatchEncoder."""
    record = json.dumps({"by": by, "identity": None, "reason": reason}, separators=(",", ":"))
    return (off, ts, "O", SVC, iid, status, 0, record)


async def _deltas(store: PartitionStore) -> list[dict[str, Any]]:
    raw = await store.redis.lrange(store.prefix(P) + "outbox", 0, -1)
    return [json.loads(entry.split(US, 2)[2]) for entry in raw]


async def test_an_operator_override_holds_until_cleared_restarted_or_removed(
    store: PartitionStore,
) -> None:
    """Issue 15 §2 (as Eureka's overriddenStatus): an override survives heartbeats and
    re-registrations of the same incarnation, shows in deltas and snapshots with who set it
    and why, loses to the instance's own DOWN, and ends with a clear, a new incarnation or a
    removal. A repeated override (a retried publish) announces nothing."""
    lease = await _lease(store)
    oos = "OUT_OF_SERVICE"
    await _apply(store, lease, [up(0, T, "a"), up(1, T, "b")])
    seen = len(await _deltas(store))

    async def new_deltas() -> list[dict[str, Any]]:
        nonlocal seen
        deltas = await _deltas(store)
        fresh, seen = deltas[seen:], len(deltas)
        return fresh

    async def shown(iid: str) -> Any:
        snap = await store.snapshot(P, SVC)
        return next(i for i in snap.instances if i.instance_id == iid)

    res = await _apply(store, lease, [override(2, T + 10, "a", oos)])
    assert (res.applied, res.changes) == (1, 1)
    [delta] = await new_deltas()
    assert delta["kind"] == "modified"
    assert delta["instance"]["status"] == oos
    assert delta["instance"]["override"] == {
        "status": oos,
        "at": T + 10,
        "by": "alice",
        "identity": None,
        "reason": "drain",
    }
    inst = await shown("a")
    assert inst.status == oos
    assert inst.override is not None
    assert inst.override.by == "alice"
    assert (await shown("b")).override is None  # only the instance named

    # heartbeats and a re-registration of the same incarnation keep it
    res = await _apply(store, lease, [up(3, T + 20, "a", seq=2), override(4, T + 30, "a", oos)])
    assert res.changes == 0, "a heartbeat or a repeated override announced something"
    assert (await shown("a")).override.at == T + 10  # type: ignore[union-attr]
    # its own DOWN wins (an operator cannot hide a failing instance's state)
    await _apply(store, lease, [up(5, T + 40, "a", seq=3, status=InstanceStatus.DOWN)])
    [delta] = await new_deltas()
    assert delta["instance"]["status"] == "DOWN"
    assert delta["instance"]["override"]["status"] == oos
    await _apply(store, lease, [up(6, T + 50, "a", seq=4)])
    assert (await new_deltas())[0]["instance"]["status"] == oos

    # a clear shows its own status again
    await _apply(store, lease, [override(7, T + 60, "a", "")])
    [delta] = await new_deltas()
    assert delta["instance"]["status"] == "UP"
    assert "override" not in delta["instance"]

    # a restart (new incarnation) ends an override
    await _apply(store, lease, [override(8, T + 70, "a", oos, by="bob", reason="deploy")])
    assert (await new_deltas())[0]["instance"]["override"]["by"] == "bob"
    await _apply(store, lease, [up(9, T + 80, "a", inc=2, seq=1)])
    [delta] = await new_deltas()
    assert delta["instance"]["status"] == "UP"
    assert "override" not in delta["instance"]

    # an unknown instance: nothing changes; a removal drops the override with the instance
    res = await _apply(store, lease, [override(10, T + 90, "ghost", oos)])
    assert (res.stale, res.changes) == (1, 0)
    await _apply(store, lease, [override(11, T + 100, "b", "DOWN")])
    await _apply(store, lease, [down(12, T + 110, "b", seq=2)])
    removed = (await new_deltas())[-1]
    assert (removed["kind"], removed["reason"]) == ("removed", "deregistered")
    assert removed["instance"]["override"]["status"] == "DOWN"
    assert await store.redis.hlen(store.prefix(P) + "ovr") == 0


# --- batched heartbeats (contract v2): op B and its items u / x ----------------------------


def batch(off: int, ts: int, *items: Event) -> list[Event]:
    """A batch message ('B') followed by its items, as BatchEncoder expands it."""
    return [(off, ts, "B", "", "", "", len(items), ""), *items]


def item(iid: str, *, seq: int = 1, ttl_ms: int = 3_000) -> Event:
    """One heartbeat of a batch ('u'): no offset or time of its own (the batch's apply)."""
    payload = _payload(iid, 1, seq, ttl_ms, InstanceStatus.UP)
    return (-1, -1, "u", SVC, iid, _version(1, seq), ttl_ms, payload)


def refused_item(letter: str) -> Event:
    """An item refused alone ('x'): its dead letter goes out through the outbox."""
    return (-1, -1, "x", "", "", "", 0, letter)


async def test_a_batch_applies_its_items_once_with_its_offset_and_clock(
    store: PartitionStore,
) -> None:
    lease = await _lease(store)
    await _apply(store, lease, [tick(9, 1_000)])
    first = await _apply(store, lease, batch(10, 1_500, item("a"), item("b", ttl_ms=2_000)))
    assert (first.offset, first.applied, first.replayed) == (10, 2, 0)
    assert [(k, iid) for k, _, _, iid in await _outbox(store)] == [("added", "a"), ("added", "b")]
    # the items' leases run from the batch's time on the partition clock
    deadlines = dict(
        await store.redis.zrange(store.prefix(P) + "deadlines", 0, -1, withscores=True)
    )
    assert deadlines[f"{SVC}\x1fa".encode()] == 1_500 + 3_000
    assert deadlines[f"{SVC}\x1fb".encode()] == 1_500 + 2_000
    # the same message again (a redelivery after a takeover): skipped whole, counted once
    again = await _apply(store, lease, batch(10, 1_500, item("a", seq=5), item("c")))
    assert (again.applied, again.replayed, again.changes) == (0, 1, 0)
    assert "c" not in {iid for _, _, _, iid in await _outbox(store)}
    # a later batch renews, and an item refused alone leaves the others applied
    letter = f"{store.namespace}.deadletter\x1funauthorised\x1f{{}}"
    later = await _apply(
        store, lease, [*batch(11, 1_800, item("a", seq=2), refused_item(letter)), tick(12, 1_900)]
    )
    assert (later.offset, later.applied, later.stale) == (12, 1, 0)
    assert later.entries == (letter.encode(),)
    # and nothing expired: the items' deadlines moved with the batch
    assert later.expired == 0
