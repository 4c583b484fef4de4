"""Several broker nodes in ``amqp_url`` / ``stream_url``: connections go to one that
answers and move on when theirs goes (issue 12). A FaultProxy in front of the broker plays
the node that dies; the broker itself, reached directly, plays the one that survives.

Guards invariant 1 from the side of availability: a registrant or a worker whose node is
gone still gets its sends confirmed, through another node.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest

from busreg import Settings
from busreg.transport.connections import connect_amqp, stream_consumer
from busreg.transport.failover import FailoverConnection
from busreg.transport.streams import StreamWriter
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.servers

DEAD = "amqp://guest:guest@127.0.0.1:1/"  # nothing listens on port 1


async def test_first_reachable_node_is_used(busreg_namespace: Settings) -> None:
    settings = busreg_namespace.model_copy(
        update={"amqp_url": f"{DEAD},{busreg_namespace.amqp_url}"}
    )
    conn = await connect_amqp(settings, "test-first-reachable")
    try:
        assert isinstance(conn, FailoverConnection)
        assert conn.url.port == urlsplit(busreg_namespace.amqp_url).port
        channel = await conn.channel()
        await channel.close()
    finally:
        await conn.close()


async def test_a_lost_connection_reconnects_to_the_next_node(busreg_namespace: Settings) -> None:
    direct = busreg_namespace.amqp_url
    url = urlsplit(direct)
    async with FaultProxy(url.hostname or "127.0.0.1", url.port or 5672) as node1:
        settings = busreg_namespace.model_copy(
            update={"amqp_url": f"{node1.url_for(direct)},{direct}"}
        )
        conn = await connect_amqp(settings, "test-failover")
        try:
            assert conn.url.port == node1.port
            channel = await conn.channel()
            queue = await channel.declare_queue("", exclusive=False, auto_delete=True)
            reconnected = asyncio.Event()
            conn.reconnect_callbacks.add(lambda *_: reconnected.set())
            # node 1 dies: its connections are reset and it takes no new ones
            node1.refuse(True)
            node1.reset_all()
            async with asyncio.timeout(15):
                await reconnected.wait()
            assert conn.url.port == url.port, "reconnected to the dead node's address"
            # the robust channel came back on the other node and works
            await channel.declare_queue(queue.name, passive=True)
            # never consumed, so auto-delete would never remove it: every run left one
            await queue.delete()
        finally:
            await conn.close()


async def test_stream_clients_skip_a_dead_node(busreg_namespace: Settings) -> None:
    endpoint = busreg_namespace.stream_endpoint()
    live = f"rabbitmq-stream://guest:guest@{endpoint.host}:{endpoint.port}/"
    async with FaultProxy(endpoint.host, endpoint.port) as dead:
        dead.refuse(True)
        settings = busreg_namespace.model_copy(
            update={"stream_url": f"{dead.url_for(live)},{live}"}
        )
        stream = f"{settings.namespace}.ingest-0"
        # connections start at the next node in turn: every start is tried, half of them
        # at the dead node first
        for n in range(4):
            writer = StreamWriter(settings, f"test-writer-{n}")
            try:
                await writer.send(stream, b'{"v":1,"type":"tick","worker":"t"}', timeout=5)
            finally:
                await writer.close()
            consumer = await stream_consumer(settings, f"test-consumer-{n}")
            await consumer.close()
        assert dead.stats.faults["refuse"] >= 2
