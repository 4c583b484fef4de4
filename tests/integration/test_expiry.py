"""Expiry: SIGKILLed registrants expire within TTL + 0.5 s of their last heartbeat; healthy
instances never expire, not even while the worker is down for longer than the TTL."""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import sys
import time

import pytest

from busreg import DeltaKind, Registry, Settings
from busreg.server.worker import Worker
from busreg.testing import running_worker

from .helpers import HERE, settings_env

pytestmark = pytest.mark.servers


async def _crash_one(settings: Settings, view_changes: object, instance_id: str) -> float:
    """Start a registrant process, SIGKILL it right after a confirmed heartbeat, and return
    (expiry announced at the watcher) - (its last confirmed heartbeat)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "registrant.py"),
        "crashy",
        instance_id,
        env=settings_env(settings),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        last_beat = 0.0
        beats = 0
        async with asyncio.timeout(20):
            while beats < 2:
                line = json.loads(await proc.stdout.readline())
                if "heartbeat" in line:
                    beats += 1
                    last_beat = line["heartbeat"]
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    async with asyncio.timeout(20):
        async for change in view_changes:  # type: ignore[attr-defined]
            if change.instance_id == instance_id and change.kind is DeltaKind.REMOVED:
                assert change.reason == "expired"
                return time.time() - last_beat
    raise AssertionError("unreachable")


async def test_sigkilled_registrant_expires_within_ttl_plus_half_a_second(
    busreg_worker: Worker, busreg_registry: Registry, busreg_namespace: Settings
) -> None:
    ttl = busreg_namespace.client.ttl
    view = await busreg_registry.watch("crashy")
    changes = view.changes()
    delays = [await _crash_one(busreg_namespace, changes, f"victim-{n}") for n in range(3)]
    print(f"crash→announce after last heartbeat: {[round(d, 3) for d in delays]} (ttl {ttl})")
    for delay in delays:
        # never before the TTL (no false expiry), and promptly after it
        assert ttl - 0.05 <= delay <= ttl + 0.5, delays
    assert statistics.median(delays) <= ttl + 0.5


async def test_healthy_instances_survive_a_worker_outage_longer_than_the_ttl(
    busreg_namespace: Settings,
) -> None:
    settings = busreg_namespace
    outage = settings.client.ttl * 2.5
    async with Registry(settings) as registrants, Registry(settings) as watcher:
        async with running_worker(settings):
            view = await watcher.watch("steady")
            changes = view.changes()
            regs = [
                await registrants.register(
                    "steady", address=f"127.0.0.1:{2000 + n}", instance_id=f"s-{n}"
                )
                for n in range(20)
            ]
            await view.wait_for(lambda i: len(i) == 20, timeout=10)
        # the worker is gone; heartbeats keep landing in the stream for 2.5 TTLs
        await asyncio.sleep(outage)  # the outage itself: time passing is the scenario
        assert all(r.heartbeats_failed == 0 for r in regs)
        async with running_worker(settings):
            # a marker registered after the restart is announced only once the new worker
            # has read through the backlog: then every expiry would have happened already
            await registrants.register("steady", address="127.0.0.1:3999", instance_id="marker")
            await view.wait_for(lambda i: "marker" in i, timeout=20)
            removed = []
            while not changes._queue.empty():
                change = await anext(changes)
                if change.kind is DeltaKind.REMOVED:
                    removed.append(change)
            assert removed == [], f"false expiry during the outage: {removed}"
            snap = await watcher.snapshot("steady")
            assert len(snap.instances) == 21
