"""Removing a namespace entirely: broker topology, per-service exchanges and Redis state.

Deleting the streams without the Redis state would leave committed offsets pointing past
the end of the new, empty streams of a namespace created again under the same name: its
workers would silently skip every event until the streams grew that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from busreg import constants as c
from busreg.errors import BusregError
from busreg.server.store import PartitionStore
from busreg.settings import Settings
from busreg.transport.connections import connect_amqp, connect_redis, translate
from busreg.transport.topology import apply_topology, delete_topology

__all__ = ["applied_namespace", "delete_namespace"]

log = logging.getLogger("busreg.admin")


@contextlib.asynccontextmanager
async def applied_namespace(settings: Settings) -> AsyncIterator[Settings]:
    """Apply the namespace's topology; on exit delete everything it created (tests, the
    demo, benchmarks). The deletion is shielded: a cancelled caller still cleans up."""
    conn = await connect_amqp(settings, "busreg-namespace-setup")
    try:
        await apply_topology(conn, settings)
    finally:
        await conn.close()
    try:
        yield settings
    finally:
        try:
            await asyncio.shield(delete_namespace(settings))
        except BusregError as exc:  # report; never mask the caller's own error
            log.warning("cleanup of namespace %s failed: %s", settings.namespace, exc)


async def delete_namespace(settings: Settings) -> int:
    """Delete everything of ``settings.namespace``; returns the Redis keys removed."""
    redis = await connect_redis(settings)
    try:
        store = PartitionStore(redis, settings.namespace)
        services: set[str] = set()
        for k in range(settings.partitions):
            services.update(row.service for row in await store.services(k))
        conn = await connect_amqp(settings, "busreg-delete-namespace")
        try:
            await delete_topology(conn, settings)
            with translate("delete service exchanges"):
                channel = await conn.channel()
                for service in services:
                    await channel.exchange_delete(c.service_exchange(settings.namespace, service))
                await channel.close()
        finally:
            await conn.close()
        return await store.purge(settings.partitions)
    finally:
        await redis.aclose()
