"""Redis side of a partition: lease tables, offsets, outbox and ownership, all via Lua.

Every write is one script call that checks the caller's fencing token first (invariant 3)
and runs atomically, so state, offset and outbox never disagree (invariants 1 and 2).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from busreg import constants as c
from busreg.transport.connections import translate
from busreg.wire.models import Instance

__all__ = ["ApplyResult", "Lease", "PartitionStore", "ServiceRow", "SnapshotRows"]


def _script(name: str) -> str:
    return (files("busreg.server") / "lua" / f"{name}.lua").read_text()


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


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class PartitionStore:
    """All Redis operations of busreg for one namespace (every partition)."""

    def __init__(self, redis: aioredis.Redis, namespace: str) -> None:
        self.redis = redis
        self.namespace = namespace
        self._apply: AsyncScript = redis.register_script(_script("apply"))
        self._acquire: AsyncScript = redis.register_script(_script("acquire"))
        self._renew: AsyncScript = redis.register_script(_script("renew"))
        self._release: AsyncScript = redis.register_script(_script("release"))
        self._outbox: AsyncScript = redis.register_script(_script("outbox"))
        self._snapshot: AsyncScript = redis.register_script(_script("snapshot"))
        self._services: AsyncScript = redis.register_script(_script("services"))
        self._workers: AsyncScript = redis.register_script(_script("workers"))
        self._leave: AsyncScript = redis.register_script(_script("leave"))
        self._workers_key = c.cluster_key_prefix(namespace) + c.KEY_WORKERS
        #: called with (events, seconds) after each committed apply batch (worker metrics)
        self.observe_apply: Callable[[int, float], None] | None = None

    def prefix(self, partition: int) -> str:
        return c.partition_key_prefix(self.namespace, partition)

    # --- ownership ----------------------------------------------------------------------

    async def acquire(self, partition: int, worker: str, lease_ms: int) -> Lease | None:
        with translate(f"acquire partition {partition}"):
            res = await self._acquire(
                keys=[self.prefix(partition)],
                args=[worker, lease_ms, secrets.token_hex(6), secrets.token_hex(4)],
            )
        if int(res[0]) != 1:
            return None
        token = _s(res[1])
        return Lease(partition, token, _s(res[2]), int(_s(res[3])), f"{worker}|{token}")

    async def renew(self, lease: Lease, lease_ms: int) -> bool:
        with translate(f"renew partition {lease.partition}"):
            res = await self._renew(
                keys=[self.prefix(lease.partition)], args=[lease.holder, lease.token, lease_ms]
            )
        return int(res) == 1

    async def release(self, lease: Lease) -> None:
        with translate(f"release partition {lease.partition}"):
            await self._release(keys=[self.prefix(lease.partition)], args=[lease.holder])

    async def owner(self, partition: int) -> str | None:
        with translate("read lease"):
            value = await self.redis.get(self.prefix(partition) + c.KEY_LEASE)
        return None if value is None else _s(value)

    async def heartbeat_worker(self, worker: str, ttl_ms: int) -> tuple[int, list[str]]:
        """Refresh ``worker`` in the live set and drop expired members; returns (Redis ms,
        live ids). Writes: readers use ``live_workers``."""
        with translate("worker membership"):
            res = await self._workers(keys=[self._workers_key], args=[worker, ttl_ms])
        return int(res[0]), sorted(_s(w) for w in res[1])

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
        count: int,
        max_step_ms: int,
        tombstone_ms: int,
        grace_ms: int,
        rebuild_until: int = -1,
    ) -> ApplyResult:
        """Apply ``count`` encoded events (8 args each, see apply.lua); raises Fenced.

        ``rebuild_until``: the stream's head offset when this owner started a partition
        that had no committed offset (it replays history quietly up to there)."""
        exchange_prefix = c.service_exchange(self.namespace, "")
        started = time.perf_counter()
        with translate(f"apply batch to partition {lease.partition}"):
            res = await self._apply(
                keys=[self.prefix(lease.partition)],
                args=[
                    lease.token, max_step_ms, tombstone_ms, exchange_prefix, count, grace_ms,
                    rebuild_until, *args,
                ],
            )
        if self.observe_apply is not None:
            self.observe_apply(count, time.perf_counter() - started)
        return ApplyResult(*(int(x) for x in res))

    async def outbox_step(
        self, lease: Lease, confirmed_upto: int, limit: int
    ) -> tuple[int, list[bytes]]:
        """Drop the entries numbered below ``confirmed_upto`` (-1: drop none) and return
        ``(number of the first entry returned, up to limit entries)``. Idempotent: the
        same call twice trims once (see outbox.lua); raises Fenced."""
        with translate(f"outbox of partition {lease.partition}"):
            res = await self._outbox(
                keys=[self.prefix(lease.partition)], args=[lease.token, confirmed_upto, limit]
            )
        return int(res[0]), list(res[1:])

    # --- reads (any worker, any time) -------------------------------------------------------

    async def snapshot(self, partition: int, service: str) -> SnapshotRows:
        with translate(f"snapshot of {service}"):
            epoch, rev, rows, rebuilding = await self._snapshot(
                keys=[self.prefix(partition)], args=[service]
            )
        instances = [Instance.model_validate_json(r) for r in rows]
        instances.sort(key=lambda i: i.instance_id)
        return SnapshotRows(_s(epoch), int(_s(rev)), instances, bool(int(rebuilding)))

    async def services(self, partition: int) -> list[ServiceRow]:
        with translate(f"services of partition {partition}"):
            res = await self._services(keys=[self.prefix(partition)])
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
