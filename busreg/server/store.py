"""Redis side of a partition: lease tables, offsets, outbox and ownership, all via Lua.

Every write is one script call that checks the caller's fencing token first (invariant 3)
and runs atomically, so state, offset and outbox never disagree (invariants 1 and 2).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from busreg import constants as c
from busreg.errors import BusregError
from busreg.transport.connections import RedisClient, translate
from busreg.wire.models import Instance

__all__ = ["ApplyResult", "Lease", "LiveSet", "PartitionStore", "ServiceRow", "SnapshotRows"]


def _script(name: str, *shared: str) -> str:
    """A Lua script's text, with the ``shared`` fragments (their local functions) in front."""
    lua = files("busreg.server") / "lua"
    return "".join((lua / f"{part}.lua").read_text() for part in (*shared, name))


@dataclass(frozen=True, slots=True)
class Lease:
    """Ownership of one partition: the token every write must present."""

    partition: int
    token: str
    epoch: str
    offset: int  # last committed stream offset, -1 if none
    holder: str  # "<worker>|<token>", the lease key's value


@dataclass(frozen=True, slots=True)
class ApplyResult:
    offset: int
    changes: int
    applied: int
    stale: int
    replayed: int
    expired: int
    outbox: int
    #: partition-clock ms until the first live lease falls due (or the grace ends); -1 with
    #: no live lease: when the owner must tick a quiet partition (see ticker.tick_delay)
    due: int = -1
    #: the outbox entries this apply appended, in order, and the number of the first (the
    #: owner publishes them at once; outbox_step reads the same entries back otherwise)
    first_entry: int = 0
    entries: tuple[bytes, ...] = ()

    def then(self, later: ApplyResult) -> ApplyResult:
        """This result followed by ``later``'s (one batch applied in two calls)."""
        return ApplyResult(
            later.offset,
            self.changes + later.changes,
            self.applied + later.applied,
            self.stale + later.stale,
            self.replayed + later.replayed,
            self.expired + later.expired,
            later.outbox,
            later.due,
            self.first_entry if self.entries else later.first_entry,
            self.entries + later.entries,
        )


@dataclass(frozen=True, slots=True)
class LiveSet:
    """One read of the live set: Redis' clock, each live worker's membership deadline (both
    Redis ms) and the partitions that have live leases."""

    now_ms: int
    deadlines: dict[str, int]
    busy: frozenset[int]

    @property
    def live(self) -> list[str]:
        return sorted(self.deadlines)


@dataclass(frozen=True, slots=True)
class SnapshotRows:
    epoch: str
    revision: int
    instances: list[Instance]
    #: the partition has no state yet, or is replaying history after a data loss: what
    #: it holds is not the registry's answer
    rebuilding: bool = False


@dataclass(frozen=True, slots=True)
class ServiceRow:
    service: str
    epoch: str
    revision: int
    instances: int


#: First element of a script's reply that names services it needed undeclared (apply.lua)
UNDECLARED = b"undeclared"


def _renewed(result: bool | BaseException) -> bool | BusregError:
    if isinstance(result, BaseException) and not isinstance(result, BusregError):
        raise result  # a bug, or a cancellation: never swallowed
    return result


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class PartitionStore:
    """All Redis operations of busreg for one namespace (every partition)."""

    def __init__(self, redis: RedisClient, namespace: str) -> None:
        self.redis = redis
        self.namespace = namespace
        self._apply: AsyncScript = redis.register_script(_script("apply", "override"))
        self._acquire: AsyncScript = redis.register_script(_script("acquire"))
        self._renew: AsyncScript = redis.register_script(_script("renew"))
        self._release: AsyncScript = redis.register_script(_script("release"))
        self._outbox: AsyncScript = redis.register_script(_script("outbox"))
        self._snapshot: AsyncScript = redis.register_script(_script("snapshot", "override"))
        self._services: AsyncScript = redis.register_script(_script("services"))
        self._workers: AsyncScript = redis.register_script(_script("workers"))
        self._leave: AsyncScript = redis.register_script(_script("leave"))
        self._workers_key = c.cluster_key_prefix(namespace) + c.KEY_WORKERS
        self._busy_key = c.cluster_key_prefix(namespace) + c.KEY_BUSY
        #: per partition, the services whose hashes the scripts declare besides a batch's
        #: own (Redis Cluster guarantees declared keys only): learnt from the scripts'
        #: "missing" replies, kept for the store's life (a stale name costs nothing)
        self._services_of: dict[int, set[str]] = {}
        #: called with (events, seconds) after each committed apply batch (worker metrics)
        self.observe_apply: Callable[[int, float], None] | None = None

    def prefix(self, partition: int) -> str:
        return c.partition_key_prefix(self.namespace, partition)

    def _keys(self, partition: int, *names: str) -> list[str]:
        prefix = self.prefix(partition)
        return [prefix + name for name in names]

    def _service_keys(self, partition: int, services: set[str]) -> list[str]:
        prefix = self.prefix(partition) + c.KEY_SERVICE
        return [prefix + s for s in sorted(services)]

    # --- ownership ----------------------------------------------------------------------

    async def acquire(self, partition: int, worker: str, lease_ms: int) -> Lease | None:
        with translate(f"acquire partition {partition}"):
            res = await self._acquire(
                keys=self._keys(partition, c.KEY_STATE, c.KEY_LEASE),
                args=[worker, lease_ms, secrets.token_hex(6), secrets.token_hex(4)],
            )
        if int(res[0]) != 1:
            return None
        token = _s(res[1])
        return Lease(partition, token, _s(res[2]), int(_s(res[3])), f"{worker}|{token}")

    async def renew(self, lease: Lease, lease_ms: int) -> bool:
        with translate(f"renew partition {lease.partition}"):
            res = await self._renew(
                keys=self._keys(lease.partition, c.KEY_STATE, c.KEY_LEASE),
                args=[lease.holder, lease.token, lease_ms],
            )
        return int(res) == 1

    async def renew_many(self, leases: Sequence[Lease], lease_ms: int) -> list[bool | BusregError]:
        """``renew`` each lease, in one round trip (a pipeline) on a single Redis; on a
        Cluster one call each (their slots differ). A failure comes back in its lease's
        place, not raised: one partition's trouble must not hide the others' renewals."""
        if not leases:
            return []
        if not isinstance(self.redis, Redis):
            got = await asyncio.gather(
                *(self.renew(lease, lease_ms) for lease in leases), return_exceptions=True
            )
            return [_renewed(r) for r in got]
        try:
            with translate("renew partitions"):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for lease in leases:
                        keys = self._keys(lease.partition, c.KEY_STATE, c.KEY_LEASE)
                        await self._renew(
                            keys=keys, args=[lease.holder, lease.token, lease_ms], client=pipe
                        )
                    res = await pipe.execute(raise_on_error=False)
        except BusregError as exc:
            return [exc] * len(leases)
        out: list[bool | BusregError] = []
        for lease, r in zip(leases, res, strict=True):
            if isinstance(r, Exception):
                try:
                    with translate(f"renew partition {lease.partition}"):
                        raise r
                except BusregError as exc:
                    out.append(exc)
            else:
                out.append(int(r) == 1)
        return out

    async def release(self, lease: Lease) -> None:
        with translate(f"release partition {lease.partition}"):
            await self._release(keys=self._keys(lease.partition, c.KEY_LEASE), args=[lease.holder])

    async def owner(self, partition: int) -> str | None:
        with translate("read lease"):
            value = await self.redis.get(self.prefix(partition) + c.KEY_LEASE)
        return None if value is None else _s(value)

    async def heartbeat_worker(self, worker: str, ttl_ms: int) -> LiveSet:
        """Refresh ``worker`` in the live set and drop expired members; returns the live
        set. Writes: readers use ``live_workers``."""
        with translate("worker membership"):
            res = await self._workers(
                keys=[self._workers_key, self._busy_key], args=[worker, ttl_ms]
            )
        pairs = res[1]
        deadlines = {_s(pairs[i]): int(float(_s(pairs[i + 1]))) for i in range(0, len(pairs), 2)}
        return LiveSet(int(res[0]), deadlines, frozenset(int(_s(k)) for k in res[2]))

    async def set_busy(self, lease: Lease, busy: bool) -> None:
        """Record whether the partition has live leases (its owner, on each change: standby
        workers tick only busy partitions). Idempotent; not fenced: a stale value only
        costs ticks or, for a partition wrongly idle whose owner dies, a late expiry."""
        key = self._busy_key
        with translate(f"busy flag of partition {lease.partition}"):
            if busy:
                await self.redis.sadd(key, str(lease.partition))
            else:
                await self.redis.srem(key, str(lease.partition))

    async def live_workers(self) -> tuple[int, list[str]]:
        """(Redis ms, live worker ids), read only: for operators with read-only access."""
        with translate("read worker membership"):
            seconds, micros = await self.redis.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            ids = await self.redis.zrangebyscore(self._workers_key, f"({now_ms}", "+inf")
        return now_ms, sorted(_s(w) for w in ids)

    async def leave(self, worker: str) -> None:
        with translate("worker membership"):
            await self._leave(keys=[self._workers_key], args=[worker])

    # --- data path ------------------------------------------------------------------------

    async def apply(
        self,
        lease: Lease,
        args: list[Any],
        max_step_ms: int,
        tombstone_ms: int,
        grace_ms: int,
        rebuild_until: int = -1,
    ) -> ApplyResult:
        """Apply encoded events, 8 args each (see apply.lua; a batched heartbeat's items are
        groups of their own); raises Fenced.

        ``rebuild_until``: the stream's head offset when this owner started a partition
        that had no committed offset (it replays history quietly up to there)."""
        count, odd = divmod(len(args), 8)
        if odd:
            raise ValueError(f"apply: {len(args)} arguments are not groups of 8")
        exchange_prefix = c.service_exchange(self.namespace, "")
        known = self._services_of.setdefault(lease.partition, set())
        # every event's service (8 fields per event: op third, service fourth)
        known.update(svc for svc in args[3::8] if svc)
        events = count
        head: list[Any] = [lease.token, max_step_ms, tombstone_ms, exchange_prefix]
        tail: list[Any] = [grace_ms, rebuild_until]
        started = time.perf_counter()
        total: ApplyResult | None = None
        # At most three calls: the batch, again with services a failover or rebuild
        # announcement needs (nothing was written), and an empty one for expiries whose
        # services were undeclared (the batch was applied). See apply.lua.
        for _ in range(3):
            keys = self._keys(lease.partition, *c.APPLY_KEYS)
            keys += self._service_keys(lease.partition, known)
            with translate(f"apply batch to partition {lease.partition}"):
                res = await self._apply(keys=keys, args=[*head, count, *tail, *args])
            if res[0] == UNDECLARED:
                known.update(_s(x) for x in res[1:])
                continue
            n = [int(x) for x in res[:9]]
            step = ApplyResult(n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7], n[8], tuple(res[9]))
            total = step if total is None else total.then(step)
            missing = [_s(x) for x in res[10:]]
            if not missing:
                break
            known.update(missing)
            args, count = [], 0
        if total is None:  # services kept appearing between calls: a bug, not a state
            raise BusregError(f"partition {lease.partition}: apply kept naming new services")
        if self.observe_apply is not None:
            self.observe_apply(events, time.perf_counter() - started)
        return total

    async def outbox_step(
        self, lease: Lease, confirmed_upto: int, limit: int
    ) -> tuple[int, list[bytes]]:
        """Drop the entries numbered below ``confirmed_upto`` (-1: drop none) and return
        ``(number of the first entry returned, up to limit entries)``. Idempotent: the
        same call twice trims once (see outbox.lua); raises Fenced."""
        with translate(f"outbox of partition {lease.partition}"):
            res = await self._outbox(
                keys=self._keys(lease.partition, c.KEY_STATE, c.KEY_OUTBOX),
                args=[lease.token, confirmed_upto, limit],
            )
        return int(res[0]), list(res[1:])

    # --- reads (any worker, any time) -------------------------------------------------------

    async def snapshot(self, partition: int, service: str) -> SnapshotRows:
        with translate(f"snapshot of {service}"):
            keys = self._keys(
                partition, c.KEY_STATE, c.KEY_REV, c.KEY_SERVICE + service, c.KEY_OVERRIDES
            )
            epoch, rev, rows, rebuilding = await self._snapshot(keys=keys, args=[service])
        instances = [Instance.model_validate_json(r) for r in rows]
        instances.sort(key=lambda i: i.instance_id)
        return SnapshotRows(_s(epoch), int(_s(rev)), instances, bool(int(rebuilding)))

    async def services(self, partition: int) -> list[ServiceRow]:
        known = self._services_of.setdefault(partition, set())
        for _ in range(3):  # again with the services the reply named (services.lua)
            keys = self._keys(partition, c.KEY_STATE, c.KEY_REV)
            keys += self._service_keys(partition, known)
            with translate(f"services of partition {partition}"):
                res = await self._services(keys=keys)
            if res[0] != UNDECLARED:
                break
            known.update(_s(x) for x in res[1:])
        else:
            raise BusregError(f"partition {partition}: services kept appearing")
        epoch = _s(res[0])
        return [
            ServiceRow(_s(res[i]), epoch, int(_s(res[i + 1])), int(res[i + 2]))
            for i in range(1, len(res), 3)
        ]

    async def partition_state(self, partition: int) -> dict[str, str]:
        with translate(f"state of partition {partition}"):
            raw = await self.redis.hgetall(self.prefix(partition) + c.KEY_STATE)
            depth = await self.redis.llen(self.prefix(partition) + c.KEY_OUTBOX)
        state = {_s(k): _s(v) for k, v in raw.items()}
        state["outbox"] = str(depth)
        return state

    async def purge(self, partitions: int) -> int:
        """Delete every key of this namespace (tests, ``topology delete``)."""
        deleted = 0
        with translate("purge namespace"):
            patterns = [self.prefix(p) + "*" for p in range(partitions)]
            patterns.append(c.cluster_key_prefix(self.namespace) + "*")
            for pattern in patterns:
                keys = [k async for k in self.redis.scan_iter(match=_glob_escape(pattern))]
                if keys:
                    deleted += int(await self.redis.delete(*keys))
        return deleted


def _glob_escape(pattern: str) -> str:
    # hash tags contain "{}" which are not glob specials, but "[" and "?" could be
    body, star = pattern[:-1], pattern[-1]
    for ch in "[]?":
        body = body.replace(ch, "\\" + ch)
    return body + star
