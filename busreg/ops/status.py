"""``busreg status``: the cluster as a controller sees it, read from Redis and the streams.

For every partition: owner and fencing token, committed offset, the stream's head offset
(read by peeking at the last chunk over the stream protocol) and so the lag, instances and
services, outbox depth, and the watermark age (how long ago, in Redis time, the newest
consumed event was written to the stream).
"""

from __future__ import annotations

import re
import time
from typing import Any

from busreg import constants as c
from busreg.errors import ConfigurationError
from busreg.server.store import PartitionStore
from busreg.settings import Settings
from busreg.transport.connections import connect_redis, translate
from busreg.transport.streams import stream_heads

__all__ = ["collect_status", "render_status"]


async def collect_status(settings: Settings) -> dict[str, Any]:
    redis = await connect_redis(settings)
    try:
        store = PartitionStore(redis, settings.namespace)
        rows: list[dict[str, Any]] = []
        for k in range(settings.partitions):
            now_ms, live = await store.live_workers()  # Redis' clock, now; read only
            state = await store.partition_state(k)
            holder = await store.owner(k)
            services = await store.services(k)
            last_ts = state.get("last_ts")
            rows.append(
                {
                    "partition": k,
                    "owner": holder.split("|", 1)[0] if holder else None,
                    "token": holder.split("|", 1)[1] if holder else None,
                    "epoch": state.get("epoch"),
                    "committed_offset": int(state.get("offset", -1)),
                    "instances": sum(s.instances for s in services),
                    "services": sum(1 for s in services if s.instances),
                    "outbox": int(state.get("outbox", 0)),
                    "watermark_age_ms": max(0, now_ms - int(float(last_ts))) if last_ts else None,
                    "applied": int(state.get("applied", 0)),
                    "expired": int(state.get("expired", 0)),
                    "replayed": int(state.get("replayed", 0)),
                    # expiry is held while the partition clock is before grace_until (an
                    # ingest outage, or an outage mark: see apply.lua)
                    "grace_left_ms": _grace_left(state),
                    "outage_marks": int(state.get("outage_marks", 0)),
                    "failovers": int(state.get("failovers", 0)),
                }
            )
        if not live and not any(row["epoch"] for row in rows):
            raise ConfigurationError(
                f"{_where(settings)} has no state for namespace {settings.namespace!r}: no "
                "worker has run it with this Redis (check the database in BUSREG_REDIS_URL, "
                "and BUSREG_NAMESPACE)"
            )
        heads = await stream_heads(settings)
        # The offsets again, now that the heads are read: lag = what the stream held when
        # its head was read and the partition had still not applied a moment later. Read
        # before the heads only, an idle partition showed the ticks written meanwhile as lag
        # (more for each partition read earlier). So lag is a lower bound, exact when idle.
        for row in rows:
            key = store.prefix(row["partition"]) + c.KEY_STATE
            with translate("read committed offsets"):
                offset = await redis.hget(key, "offset")
            row["committed_offset"] = int(offset) if offset is not None else -1
            row["head_offset"] = heads.get(row["partition"], -1)
            row["lag"] = max(0, row["head_offset"] - row["committed_offset"])
        partitions = rows
    finally:
        await redis.aclose()
    return {
        "namespace": settings.namespace,
        "time": time.time(),
        "workers": live,
        "partitions": partitions,
    }


def render_status(report: dict[str, Any]) -> str:
    lines = [
        f"namespace {report['namespace']}: {len(report['workers'])} live worker(s): "
        + (", ".join(report["workers"]) or "none")
    ]
    header = ["P", "OWNER", "TOKEN", "OFFSET", "HEAD", "LAG", "INST", "SVC", "OUTBOX", "WM AGE"]
    rows = [
        [
            str(p["partition"]),
            p["owner"] or "-",
            p["token"] or "-",
            str(p["committed_offset"]),
            str(p["head_offset"]),
            str(p["lag"]),
            str(p["instances"]),
            str(p["services"]),
            str(p["outbox"]),
            "-" if p["watermark_age_ms"] is None else f"{p['watermark_age_ms'] / 1000:.1f}s",
        ]
        for p in report["partitions"]
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=False)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) for r in rows]
    held = [p for p in report["partitions"] if p.get("grace_left_ms")]
    if held:
        lines.append(
            "expiry held (outage grace): "
            + ", ".join(f"P{p['partition']} {p['grace_left_ms'] / 1000:.1f}s" for p in held)
        )
    return "\n".join(lines)


def _where(settings: Settings) -> str:
    # without the credentials; several hosts (Sentinel, Cluster) stay as they are
    return "Redis " + re.sub(r"//[^@/]*@", "//", settings.redis_url)


def _grace_left(state: dict[str, str]) -> int:
    clock, until = state.get("clock"), state.get("grace_until")
    if not clock or not until:
        return 0
    return max(0, int(float(until)) - int(float(clock)))
