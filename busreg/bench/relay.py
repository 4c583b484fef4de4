"""The bare 3-hop path, as a subprocess: stream → (rstream consume) → Redis → AMQP exchange.

It is what a shard worker does with none of busreg's work: no decoding, no lease table, no
outbox; one Redis write per batch (one HSET of every message) and one AMQP publish per
message with publisher confirms awaited per batch, like the worker's outbox drain. The
bench publishes to ``STREAM`` and consumes ``EXCHANGE`` with aio-pika, and the difference
is the floor busreg's register → watcher latency is compared with.

    python -m busreg.bench.relay STREAM EXCHANGE REDIS_KEY     (settings from BUSREG_*)
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import aiormq

from busreg.settings import load_settings
from busreg.transport.connections import connect_amqp, connect_redis, stream_consumer

__all__ = ["main"]


async def relay(stream: str, exchange: str, key: str) -> None:
    from rstream import ConsumerOffsetSpecification, OffsetType

    settings = load_settings()
    redis = await connect_redis(settings)
    amqp = await connect_amqp(settings, "busreg-bench-relay")
    consumer = await stream_consumer(settings, "busreg-bench-relay")
    try:
        channel = await amqp.channel(publisher_confirms=True)
        underlay = await channel.get_underlay_channel()
        buf: list[tuple[int, bytes]] = []
        has_data = asyncio.Event()
        stop = asyncio.Event()

        def on_message(body: bytes, ctx: Any) -> None:
            buf.append((ctx.offset, body))
            has_data.set()

        def on_signal() -> None:
            stop.set()
            has_data.set()

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, on_signal)
        loop.add_signal_handler(signal.SIGINT, on_signal)
        await consumer.subscribe(
            stream,
            on_message,
            offset_specification=ConsumerOffsetSpecification(OffsetType.NEXT, None),
            initial_credit=20,
        )
        print("ready", flush=True)
        props = aiormq.spec.Basic.Properties(delivery_mode=2, content_type="application/json")
        while True:
            await has_data.wait()
            if stop.is_set():
                return
            batch = buf[:]
            buf.clear()
            has_data.clear()
            if not batch:
                continue
            await redis.hset(key, mapping={str(off): body for off, body in batch})
            futures = [
                asyncio.ensure_future(
                    underlay.basic_publish(
                        body, exchange=exchange, routing_key="floor", properties=props
                    )
                )
                for _, body in batch
            ]
            await asyncio.gather(*futures)
    finally:
        for closer in (consumer.close, amqp.close, redis.aclose):
            try:
                async with asyncio.timeout(5):
                    await closer()
            except Exception as exc:  # closing is best effort
                print(f"relay: close failed: {exc!r}", file=sys.stderr)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m busreg.bench.relay STREAM EXCHANGE REDIS_KEY", file=sys.stderr)
        return 2
    asyncio.run(relay(*argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
