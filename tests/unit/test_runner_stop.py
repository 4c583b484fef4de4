"""A runner's apply loop ends on stop() whatever it was doing: found by the takeover bench,
where a SIGTERMed worker held two partitions for the whole 5 s drain deadline because the
stop came while heartbeats were coalescing and the loop then cleared its wake-up."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest

from busreg import Settings
from busreg.server import runner as runner_module
from busreg.server.runner import PartitionRunner
from busreg.server.store import ApplyResult, Lease
from busreg.wire.codec import encode_event
from busreg.wire.models import Heartbeat
from busreg.wire.routing import partition_for


class _Store:
    def __init__(self) -> None:
        self.applied = 0

    async def apply(self, lease: Lease, args: list[Any], *rest: Any, **kw: Any) -> ApplyResult:
        count = len(args) // 8
        self.applied += count
        return ApplyResult(lease.offset + count, 0, count, 0, 0, 0, 0, 3000)

    async def set_busy(self, lease: Lease, busy: bool) -> None:
        pass


async def test_a_stop_that_comes_while_heartbeats_coalesce_ends_the_apply_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner_module, "COALESCE_WINDOW", 30.0)  # a wait a stop must cut
    settings = Settings(partitions=1)
    lease = Lease(partition=0, token="e/1.n", epoch="e", offset=5, holder="w|e/1.n")
    store = _Store()
    runner = PartitionRunner(
        lease, settings, cast(Any, store), cast(Any, None), cast(Any, None), "w"
    )
    coalescing = asyncio.Event()
    real = runner._coalesce

    async def coalesce() -> None:
        coalescing.set()
        await real()

    monkeypatch.setattr(runner, "_coalesce", coalesce)
    beat = Heartbeat(service="svc", instance_id="i", incarnation=1, seq=1, address="10.0.0.1:1")
    assert partition_for("svc", 1) == 0
    loop = asyncio.create_task(runner._apply_loop())
    await runner._on_message(encode_event(beat), SimpleNamespace(offset=6, timestamp=1_000))
    async with asyncio.timeout(5):  # hang guards, not timing
        await coalescing.wait()
        runner.stop()
        await loop
    assert store.applied == 1  # what was read is applied before the loop ends
    assert runner._applied_all.is_set()
