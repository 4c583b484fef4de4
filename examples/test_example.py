"""The example app against real servers, in-process, with busreg's pytest fixtures only.

BUSREG_TEST_AMQP_URL=... BUSREG_TEST_REDIS_URL=... pytest examples/test_example.py
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from inventory_app import GROUP, SERVICE, busreg_instance, create_app

from busreg import DeltaKind, Registry, Settings, Worker
from busreg import constants as c
from busreg.transport.connections import connect_amqp

pytestmark = pytest.mark.servers


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def audited(path: Path, count: int, timeout: float = 10.0) -> list[dict[str, object]]:
    """The audit lines, once there are ``count`` of them (the app writes them to disk)."""
    async with asyncio.timeout(timeout):
        while True:
            lines = read_lines(path)
            if len(lines) >= count:
                return [json.loads(line) for line in lines]
            await asyncio.sleep(0.02)  # the file is the app's only output


async def test_app_registers_audits_its_group_and_deregisters(
    busreg_worker: Worker, busreg_registry: Registry, busreg_namespace: Settings, tmp_path: Path
) -> None:
    view = await busreg_registry.watch(SERVICE)
    changes = view.changes()
    audit = tmp_path / "audit.jsonl"
    app = create_app(
        busreg_namespace, address="127.0.0.1:18080", instance_id="inv-ex", audit_log=str(audit)
    )
    try:
        async with app:
            instance = busreg_instance(app)
            async with asyncio.timeout(10):
                added = await anext(changes)
            assert (added.kind, added.instance_id) == (DeltaKind.ADDED, "inv-ex")
            assert view.instances["inv-ex"].address == "127.0.0.1:18080"
            assert instance.registration.instance_id == "inv-ex"
            # a second instance registered elsewhere: the app audits both deltas, once each
            other = await busreg_registry.register(SERVICE, address="127.0.0.1:18081")
            lines = await audited(audit, 2)
            assert [(x["revision"], x["outcome"]) for x in lines] == [
                (1, "audited"),
                (2, "audited"),
            ]
            assert lines[1]["instance_id"] == other.instance_id
        async with asyncio.timeout(10):
            removed = await anext(changes)
            while removed.instance_id != "inv-ex":
                removed = await anext(changes)
        assert (removed.kind, removed.reason) == (DeltaKind.REMOVED, "deregistered")
    finally:
        conn = await connect_amqp(busreg_namespace, "example-cleanup")
        try:
            channel = await conn.channel()
            await channel.queue_delete(c.group_queue(busreg_namespace.namespace, SERVICE, GROUP))
        finally:
            await conn.close()
