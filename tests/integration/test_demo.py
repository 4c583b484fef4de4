"""``busreg demo`` runs to completion on real brokers, measures both figures, cleans up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sys

import aiormq
import httpx
import pytest

from busreg import Settings
from busreg import constants as c
from busreg.testing import BusregServers
from busreg.transport.connections import connect_amqp, connect_redis

# the demo is a 20 s story with timing figures: it runs on its own, with the long scenarios
pytestmark = [pytest.mark.servers, pytest.mark.soak]

DURATION = 20


async def test_demo_runs_measures_and_cleans_up(busreg_servers: BusregServers) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUSREG_")}
    env.update(
        BUSREG_AMQP_URL=busreg_servers.amqp_url,
        BUSREG_REDIS_URL=busreg_servers.redis_url,
        PYTHONUNBUFFERED="1",
    )
    if busreg_servers.stream_url:
        env["BUSREG_STREAM_URL"] = busreg_servers.stream_url
    with socket.socket() as sock:  # a free port for the dashboard
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "busreg", "demo", "--duration", str(DURATION),
        "--gateway", str(port),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    raw = bytearray()

    async def read_all() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            raw.extend(chunk)
        await proc.wait()

    services: set[str] = set()

    async def dashboard() -> None:
        """`--gateway`: the dashboard's API shows the demo's services while it runs."""
        async with httpx.AsyncClient(timeout=2.0) as http:
            while not {"cart", "inventory"} <= services and proc.returncode is None:
                with contextlib.suppress(httpx.HTTPError):
                    reply = await http.get(f"http://127.0.0.1:{port}/api/v1/services")
                    services.update(s["service"] for s in reply.json()["services"])
                await asyncio.sleep(0.2)  # polling another process's HTTP API

    try:
        async with asyncio.timeout(DURATION + 45), asyncio.TaskGroup() as tg:
            tg.create_task(dashboard())
            await read_all()
    except TimeoutError:
        proc.terminate()  # the demo cleans up on SIGTERM
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await read_all()
        pytest.fail(f"busreg demo did not end in time:\n{raw.decode(errors='replace')}")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out = raw.decode(errors="replace")
    assert proc.returncode == 0, out
    assert f"dashboard and HTTP API: http://127.0.0.1:{port}/" in out
    assert {"cart", "inventory"} <= services, (services, out)

    # both figures, in the story's order, and plausible for the default timings
    detection = re.search(r"^detection time: (\d+\.\d+) s \(last heartbeat", out, re.M)
    takeover = re.search(r"^takeover time: (\d+\.\d+) s \(SIGKILL of demo-w", out, re.M)
    assert detection is not None, out
    assert takeover is not None, out
    ttl = Settings().client.ttl
    assert ttl <= float(detection.group(1)) < ttl + 2, out
    assert 0 < float(takeover.group(1)) < 5, out
    assert "cart's view: inventory-3 removed (expired)" in out
    assert "ejected locally" in out  # the caller saw the crash before the registry did

    # it cleaned up after itself: no demo keys are left in Redis (a fresh namespace each
    # run, so any key with its name is a leftover) and it said so
    match = re.search(r"namespace (demo-[0-9a-f]{8}) deleted", out)
    assert match is not None, out
    namespace = match.group(1)
    redis = await connect_redis(Settings(redis_url=busreg_servers.redis_url))
    try:
        leftovers = [k async for k in redis.scan_iter(match=f"*{namespace}*")]
    finally:
        await redis.aclose()
    assert leftovers == []
    assert "process logs kept" not in out
    conn = await connect_amqp(Settings(amqp_url=busreg_servers.amqp_url), "test-demo-check")
    try:
        for name in (c.ingest_partition(namespace, 0), c.rpc_queue(namespace)):
            channel = await conn.channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(name, passive=True)
        channel = await conn.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await channel.declare_exchange(c.service_exchange(namespace, "inventory"), passive=True)
    finally:
        await conn.close()
