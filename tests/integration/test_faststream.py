"""The FastStream example app (examples/inventory_app.py) as real processes on real servers:
it registers and another process sees it, two members of one consumer group each get a
share of the deltas and together every delta exactly once, a handler that raises is
redelivered a bounded number of times and then dead-lettered, and SIGTERM deregisters."""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from faststream import FastStream
from faststream.rabbit import RabbitBroker

from busreg import ConfigurationError, DeltaKind, Instance, Registry, Settings, Worker
from busreg import constants as c
from busreg.client.groups import DELIVERY_LIMIT
from busreg.integrations.faststream_app import register_app
from busreg.transport.connections import connect_amqp

from .helpers import eventually, settings_env, stop_process

pytestmark = pytest.mark.servers

APP = Path(__file__).resolve().parents[2] / "examples" / "inventory_app.py"
GROUP = "inventory-audit"


def spawn_app(
    settings: Settings, instance_id: str, port: int, tmp: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    audit = tmp / f"{instance_id}.audit.jsonl"
    log = open(tmp / f"{instance_id}.log", "ab")  # noqa: SIM115 - the child's, for its lifetime
    proc = subprocess.Popen(
        [sys.executable, str(APP)],
        env=settings_env(
            settings,
            INVENTORY_ADDRESS=f"127.0.0.1:{port}",
            INVENTORY_INSTANCE_ID=instance_id,
            INVENTORY_AUDIT_LOG=str(audit),
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, audit


def contains(instance_id: str, instances: dict[str, Instance]) -> bool:
    return instance_id in instances


def read_audit(*paths: Path) -> list[dict[str, Any]]:
    lines = []
    for path in paths:
        if path.exists():
            lines += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return lines


async def dead_letters(settings: Settings) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Everything in ``<ns>.deadletter`` now: (body, headers)."""
    conn = await connect_amqp(settings, "dead-letter-reader")
    got = []
    try:
        channel = await conn.channel()
        queue = await channel.get_queue(c.dead_letter_queue(settings.namespace))
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            got.append((orjson.loads(message.body), dict(message.headers)))
    finally:
        await conn.close()
    return got


async def test_example_app_registers_shares_a_group_and_dead_letters_poison(
    busreg_worker: Worker, busreg_namespace: Settings, tmp_path: Path
) -> None:
    settings = busreg_namespace
    procs: list[subprocess.Popen[bytes]] = []
    try:
        async with Registry(settings, name="observer") as observer:
            view = await observer.watch("inventory")
            changes = view.changes()
            # 1. two app processes register; this (another) process sees them
            audits = []
            for n, iid in enumerate(("app-a", "app-b")):
                proc, audit = spawn_app(settings, iid, 18100 + n, tmp_path)
                procs.append(proc)
                audits.append(audit)
                # each app registers only after its group member consumes (after_startup)
                await view.wait_for(functools.partial(contains, iid), timeout=30)
            assert view.instances["app-a"].address == "127.0.0.1:18100"
            assert view.instances["app-b"].address == "127.0.0.1:18101"

            # 2. deltas of the group are shared: each exactly once across both members
            total = 40
            for n in range(total):
                await observer.register(
                    "inventory", address=f"127.0.0.1:{19000 + n}", instance_id=f"inv-{n}"
                )
            await view.wait_for(lambda i: len(i) == total + 2, timeout=15)
            last = view.revision

            async def audit_lines() -> list[dict[str, Any]]:
                return read_audit(*audits)

            lines = await eventually(
                audit_lines,
                lambda got: len(got) >= last,
                timeout=15,
                what=f"{last} audited deltas",
            )
            revisions = sorted(int(x["revision"]) for x in lines)
            assert revisions == list(range(1, last + 1)), "every delta exactly once"
            by_member = {m: sum(1 for x in lines if x["member"] == m) for m in ("app-a", "app-b")}
            print(f"\ngroup share of {last} deltas: {by_member}")
            assert all(by_member.values()), f"both members take turns: {by_member}"

            # 3. a handler that raises: redelivered a bounded number of times, dead-lettered
            poison = await observer.register(
                "inventory",
                address="127.0.0.1:19999",
                instance_id="poison",
                metadata={"audit": "reject"},
            )
            await view.wait_for(lambda i: "poison" in i, timeout=10)
            poison_rev = view.revision
            dead = await eventually(
                lambda: dead_letters(settings),
                lambda got: bool(got),
                timeout=20,
                what="the poison delta in the dead-letter queue",
            )
            body, headers = dead[0]
            assert body["revision"] == poison_rev
            assert body["instance"]["instance_id"] == "poison"
            deaths = headers.get("x-death")
            print(f"dead-letter headers: x-death={deaths!r}")
            attempts = [x for x in read_audit(*audits) if x["outcome"] == "rejected"]
            print(f"poison delta delivered {len(attempts)} times, then dead-lettered")
            assert 2 <= len(attempts) <= DELIVERY_LIMIT + 1
            # the group was not blocked: a later delta is audited
            await observer.register("inventory", address="127.0.0.1:19998", instance_id="after")
            await view.wait_for(lambda i: "after" in i, timeout=10)
            after_rev = view.revision
            await eventually(
                audit_lines,
                lambda got: any(x["revision"] == after_rev for x in got),
                timeout=10,
                what="the delta after the poison",
            )
            await poison.deregister()

            # 4. SIGTERM: each app deregisters before it exits
            removed: set[str] = set()
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                async for change in changes:
                    if change.kind is DeltaKind.REMOVED and change.instance_id.startswith("app-"):
                        assert change.reason == "deregistered"
                        removed.add(change.instance_id)
                        if len(removed) == 2:
                            break
            for proc in procs:
                assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        for proc in procs:
            stop_process(proc, signal.SIGKILL)
        conn = await connect_amqp(settings, "cleanup")
        try:
            channel = await conn.channel()
            await channel.queue_delete(c.group_queue(settings.namespace, "inventory", GROUP))
        finally:
            await conn.close()


async def test_a_registration_failure_fails_the_apps_start(busreg_namespace: Settings) -> None:
    broker = RabbitBroker(busreg_namespace.amqp_url)
    app = FastStream(broker)
    instance = register_app(app, busreg_namespace, "inventory", address="no-port")
    with pytest.raises(ConfigurationError, match="address"):
        await app.start()
    assert not instance.running
    await app.stop()  # shutdown still works (nothing to deregister)
