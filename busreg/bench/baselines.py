"""Raw limits measured in the same run: the denominators of every ratio.

* stream publish with confirms and stream consume (rstream, heartbeat-sized messages);
* Redis: pipelined writes (HSET + ZADD per lease update) and the same in a Lua batch, plus
  busreg's own ``apply.lua`` fed pre-encoded heartbeats (no Python in the way);
* AMQP publish with confirms (the outbox drain's primitive);
* the Python per-event cost of the worker's decode path (``decode_ingest`` +
  ``encode_instance``), in-process;
* the 3-hop floor: stream → relay (subprocess) → Redis → AMQP exchange → aio-pika consumer,
  at a steady ``floor_rate`` events/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sys
import time
from typing import Any

import aio_pika
import aiormq

from busreg import constants as c
from busreg.bench.common import BenchConfig, percentiles
from busreg.bench.loadgen import blast, instance_template
from busreg.bench.procs import Processes, settings_env
from busreg.server.store import PartitionStore
from busreg.settings import Settings
from busreg.transport.connections import (
    connect_amqp,
    connect_redis,
    stream_consumer,
    stream_producer,
)
from busreg.wire.codec import decode_ingest, encode_instance
from busreg.wire.models import Heartbeat, Register
from busreg.wire.routing import partition_for

__all__ = ["run_baselines"]

LUA_LEASES = """
local n = tonumber(ARGV[1])
for i = 0, n - 1 do
  redis.call('HSET', KEYS[1], ARGV[2 + i * 2], ARGV[3 + i * 2])
  redis.call('ZADD', KEYS[2], ARGV[3 + i * 2], ARGV[2 + i * 2])
end
return n
"""


def _heartbeat(i: int, seq: int, services: int = 100) -> bytes:
    _, before, after = instance_template(i, services, 1_700_000_000_000_000_000, 3.0)
    return before + b"%d" % seq + after


def raw_stream_arguments(settings: Settings, max_bytes: int) -> dict[str, Any]:
    """A raw baseline stream replicated as busreg's ingest partitions are (topology.py)."""
    args: dict[str, Any] = {"max-length-bytes": max_bytes}
    replicas = settings.stream_replica_count()
    if replicas > 1:
        args["initial-cluster-size"] = replicas
        args["queue-leader-locator"] = "balanced"
    return args


async def stream_rates(settings: Settings, count: int) -> dict[str, Any]:
    from rstream import ConsumerOffsetSpecification, OffsetType

    body = _heartbeat(1, 1)
    stream = f"{settings.namespace}.raw-0"
    producer = await stream_producer(settings, "busreg-bench-raw")
    try:
        await producer.create_stream(
            stream, arguments=raw_stream_arguments(settings, 1 << 30), exists_ok=True
        )
        publish = await blast(producer, stream, body, count)
        consumer = await stream_consumer(settings, "busreg-bench-raw")
        try:
            got = 0
            done = asyncio.Event()

            def on_message(_body: bytes, _ctx: Any) -> None:
                nonlocal got
                got += 1
                if got >= count:
                    done.set()

            t0 = time.perf_counter()
            await consumer.subscribe(
                stream,
                on_message,
                offset_specification=ConsumerOffsetSpecification(OffsetType.FIRST, None),
                initial_credit=20,
            )
            async with asyncio.timeout(60):
                await done.wait()
            consume = count / (time.perf_counter() - t0)
        finally:
            await consumer.close()
        with contextlib.suppress(Exception):
            await producer.delete_stream(stream, missing_ok=True)
    finally:
        await producer.close()
    return {
        "message_bytes": len(body),
        "messages": count,
        "stream_publish_per_s": publish,
        "stream_consume_per_s": consume,
    }


async def redis_rates(settings: Settings, updates: int) -> dict[str, Any]:
    redis = await connect_redis(settings)
    prefix = c.cluster_key_prefix(settings.namespace)
    ver, dls = prefix + "raw-ver", prefix + "raw-deadlines"
    batch = 1000
    fields = [f"svc-{i % 100:04d}\x1fi{i:07d}" for i in range(batch)]
    try:
        t0 = time.perf_counter()
        for start in range(0, updates, batch):
            pipe = redis.pipeline(transaction=False)
            for j, f in enumerate(fields):
                pipe.hset(ver, f, start + j)
                pipe.zadd(dls, {f: start + j})
            await pipe.execute()
        pipelined = updates / (time.perf_counter() - t0)

        script = redis.register_script(LUA_LEASES)
        t0 = time.perf_counter()
        for start in range(0, updates, batch):
            args: list[Any] = [batch]
            for j, f in enumerate(fields):
                args += (f, start + j)
            await script(keys=[ver, dls], args=args)
        lua = updates / (time.perf_counter() - t0)
        await redis.delete(ver, dls)
        apply_rate = await apply_lua_rate(settings, redis, updates)
    finally:
        await redis.aclose()
    return {
        "redis_pipelined_updates_per_s": pipelined,
        "redis_lua_updates_per_s": lua,
        "lua_to_pipeline_ratio": lua / pipelined,
        **apply_rate,
    }


async def apply_lua_rate(settings: Settings, redis: Any, updates: int) -> dict[str, Any]:
    """busreg's apply.lua on partition 0 of the bench namespace (no worker runs there):
    pre-encoded heartbeats of 10,000 instances in batches of 1,000."""
    store = PartitionStore(redis, settings.namespace)
    k = 0
    lease = await store.acquire(k, "bench-direct", 600_000)
    assert lease is not None
    instances = 10_000
    now_ms = int(time.time() * 1000)
    rows = []
    services = [f"svc-{j:04d}" for j in range(100)]
    for i in range(instances):
        hb = Heartbeat.model_validate_json(_heartbeat(i, 1))
        rows.append((services[i % 100], hb.instance_id, encode_instance(hb.instance())))
    # the grace argument came with outage handling; call either shape of the API
    extra = {"grace_ms": 0} if "grace_ms" in inspect.signature(store.apply).parameters else {}
    offset = 0
    seq = 0

    def batch_args(start: int) -> list[Any]:
        nonlocal offset, seq
        args: list[Any] = []
        for i in range(start, start + 1000):
            service, iid, inst = rows[i % instances]
            offset += 1
            seq += 1
            args += (offset, now_ms + offset // 1000, "U", service, iid, f"{1:020d}{seq:016d}")
            args += (3000, inst)
        return args

    # register everything once (adds, with deltas in the outbox), then time heartbeats
    for start in range(0, instances, 1000):
        await store.apply(lease, batch_args(start), 1000, 300_000, **extra)
    batches = [batch_args(s) for s in range(0, updates, 1000)]
    t0 = time.perf_counter()
    for args in batches:
        await store.apply(lease, args, 1000, 300_000, **extra)
    rate = updates / (time.perf_counter() - t0)
    out: dict[str, Any] = {
        "apply_lua_heartbeats_per_s": rate,
        "apply_lua_us_per_heartbeat": 1e6 / rate,
    }
    replicas = int((await redis.info("replication")).get("connected_slaves", 0))
    if replicas:
        # What "WAIT 1" before publishing deltas would cost (docs/operations.md, "No
        # WAIT"): one small batch per call, as at 1,000 heartbeats/s, timed alone and
        # followed by WAIT 1 (the replica acknowledging what the batch wrote).
        plain: list[float] = []
        waited: list[float] = []
        for n in range(600):
            args = batch_args(0)[: 8 * 10]
            t = time.perf_counter()
            await store.apply(lease, args, 1000, 300_000, **extra)
            if n % 2:
                acked = await redis.execute_command("WAIT", 1, 1000)
                if int(acked) < 1:
                    continue  # the replica did not answer in time: not a latency sample
                waited.append(time.perf_counter() - t)
            else:
                plain.append(time.perf_counter() - t)
        out["apply_latency_ms"] = percentiles(plain, 1000.0)
        out["apply_wait1_latency_ms"] = percentiles(waited, 1000.0)
    await store.release(lease)
    return out


def decode_cost(count: int = 20_000) -> dict[str, Any]:
    """µs per heartbeat of the worker's Python decode path (BatchEncoder.encode's calls)."""
    bodies = [_heartbeat(i, i + 1) for i in range(count)]
    cache: dict[str, int] = {}
    t0 = time.perf_counter()
    for body in bodies:
        event = decode_ingest(body).event
        if not isinstance(event, Register | Heartbeat):
            continue
        k = cache.get(event.service)
        if k is None:
            k = cache[event.service] = partition_for(event.service, 8)
        _ = f"{event.incarnation:020d}{event.seq:016d}"
        encode_instance(event.instance())
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    for body in bodies:
        decode_ingest(body)
    decode_only = time.perf_counter() - t0
    return {
        "python_decode_encode_us_per_event": total / count * 1e6,
        "python_decode_only_us_per_event": decode_only / count * 1e6,
        "python_decode_events_per_s": count / total,
    }


async def amqp_publish_rate(settings: Settings, count: int) -> dict[str, Any]:
    """aio-pika publishes with confirms to a topic exchange, gathered per 500 (the outbox
    drain's pattern)."""
    conn = await connect_amqp(settings, "busreg-bench-amqp")
    name = f"{settings.namespace}.rawx"
    try:
        channel = await conn.channel(publisher_confirms=True)
        await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, auto_delete=False)
        underlay = await channel.get_underlay_channel()
        body = _heartbeat(2, 2)
        props = aiormq.spec.Basic.Properties(delivery_mode=2)
        t0 = time.perf_counter()
        for start in range(0, count, 500):
            n = min(500, count - start)
            await asyncio.gather(
                *(
                    underlay.basic_publish(body, exchange=name, routing_key="x", properties=props)
                    for _ in range(n)
                )
            )
        rate = count / (time.perf_counter() - t0)
        await channel.exchange_delete(name)
        await channel.close()
    finally:
        await conn.close()
    return {"amqp_publish_confirmed_per_s": rate}


async def floor_latency(
    settings: Settings, procs: Processes, cfg: BenchConfig
) -> tuple[dict[str, Any], list[float]]:
    """Latency of the bare 3-hop path at a steady ``floor_rate`` events/s (seconds)."""
    stream = f"{settings.namespace}.floor-0"
    exchange = f"{settings.namespace}.floor"
    key = c.cluster_key_prefix(settings.namespace) + "floor"
    producer = await stream_producer(settings, "busreg-bench-floor")
    conn = await connect_amqp(settings, "busreg-bench-floor")
    sent: dict[int, float] = {}
    lat: list[float] = []
    relay = None
    try:
        await producer.create_stream(
            stream, arguments=raw_stream_arguments(settings, 1 << 28), exists_ok=True
        )
        channel = await conn.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC)
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(ex, routing_key="#")

        async def on_delivery(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            now = time.perf_counter()
            i = int(message.body[6 : message.body.index(b",")])
            t = sent.pop(i, None)
            if t is not None:
                lat.append(now - t)

        await queue.consume(on_delivery, no_ack=True)
        relay = procs.spawn(
            "relay",
            [sys.executable, "-m", "busreg.bench.relay", stream, exchange, key],
            settings_env(settings),
        )
        deadline = time.monotonic() + 20
        while "ready" not in relay.tail() and time.monotonic() < deadline:
            if not relay.alive():
                raise RuntimeError(f"3-hop relay exited: {relay.tail()}")
            await asyncio.sleep(0.05)
        pad = b"x" * 200
        total = int(cfg.floor_seconds * cfg.floor_rate)
        interval = 1.0 / cfg.floor_rate
        loop = asyncio.get_running_loop()
        warmup = min(100, total // 10)
        next_at = loop.time()
        for i in range(total + warmup):
            next_at += interval
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            body = b'{"id":%d,"pad":"%s"}' % (i, pad)
            if i >= warmup:
                sent[i] = time.perf_counter()
            await producer.send_batch(stream, [body])
        deadline = time.monotonic() + 5
        # the last deliveries: a short poll, the consumer callback owns ``sent``
        while sent and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        lost = len(sent)
        await channel.exchange_delete(exchange)
        await channel.close()
    finally:
        if relay is not None:
            await procs.stop(relay)
        with contextlib.suppress(Exception):
            await producer.delete_stream(stream, missing_ok=True)
        await producer.close()
        await conn.close()
    stats = percentiles(lat, scale=1000.0)
    return {"rate_per_s": cfg.floor_rate, "lost": lost, "latency_ms": stats}, lat


async def run_baselines(
    settings: Settings, procs: Processes, cfg: BenchConfig
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    out: dict[str, Any] = {}
    out.update(await stream_rates(settings, cfg.raw_messages))
    out.update(await redis_rates(settings, cfg.redis_updates))
    out.update(await amqp_publish_rate(settings, max(5_000, cfg.raw_messages // 15)))
    out.update(decode_cost(5_000 if cfg.quick else 20_000))
    floor, samples = await floor_latency(settings, procs, cfg)
    out["floor"] = floor
    return out, {"floor": samples}
