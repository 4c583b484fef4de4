"""ServiceView's inbox and run loop without a broker (invariant 5: a subscriber that sees a
gap, here one it made itself by dropping deltas or failing to apply one, re-reads a
snapshot)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest

from busreg.client.view import RESYNC, ServiceView
from busreg.wire.models import Delta, DeltaKind, Instance, Snapshot

from . import examples as ex

SERVICE = "inventory"


class FakeRpc:
    """Answers snapshot requests from ``truth`` (what the workers would hold)."""

    def __init__(self) -> None:
        self.truth: dict[str, Instance] = {}
        self.revision = 0
        self.reads = 0

    def change(self, inst: Instance) -> Delta:
        self.revision += 1
        self.truth[inst.instance_id] = inst
        return Delta(
            kind=DeltaKind.ADDED, service=SERVICE, epoch="e1", revision=self.revision, instance=inst
        )

    async def snapshot(self, service: str, timeout: float) -> Snapshot:
        self.reads += 1
        return Snapshot(
            service=service,
            epoch="e1",
            revision=self.revision,
            instances=list(self.truth.values()),
        )


async def loaded_view(rpc: FakeRpc, queue_max: int = 10) -> ServiceView:
    connection = SimpleNamespace(reconnect_callbacks=set())
    view = ServiceView(
        SERVICE,
        cast(Any, connection),
        cast(Any, rpc),
        "ns",
        request_timeout=1.0,
        queue_max=queue_max,
        resync_interval=None,
    )
    await view.resync()  # the first snapshot, as start() reads it
    return view


async def test_a_full_inbox_is_dropped_for_exactly_one_resync() -> None:
    """Invariant 5: deltas the view had no room for are a gap; it is closed by one snapshot
    read per overflow (not one per dropped delta), and the inbox never passes its bound."""
    rpc = FakeRpc()
    view = await loaded_view(rpc, queue_max=10)
    for i in range(35):  # the run loop is not running: nothing is taken out
        view._offer(rpc.change(ex.instance(f"i{i}")))
        assert view._inbox.qsize() <= 10
    assert view.overflows == 1
    assert view._inbox.get_nowait() is RESYNC  # what was queued is gone; a resync is first

    runner = asyncio.create_task(view.run())
    await view.wait_for(lambda i: len(i) == 35, timeout=5)
    assert view.revision == 35
    assert view.instances == rpc.truth
    assert rpc.reads == 2  # the first load and the one resync
    await view.close()
    async with asyncio.timeout(5):
        await runner


async def test_an_overflow_after_the_resync_is_a_new_overflow() -> None:
    """Invariant 5: once the resync of an overflow was taken, a later overflow needs (and
    gets) its own snapshot read."""
    rpc = FakeRpc()
    view = await loaded_view(rpc, queue_max=10)
    for i in range(11):
        view._offer(rpc.change(ex.instance(f"i{i}")))
    assert view.overflows == 1
    await view._handle(cast(Any, view._inbox.get_nowait()))  # the RESYNC
    for i in range(11, 30):
        view._offer(rpc.change(ex.instance(f"i{i}")))
    assert view.overflows == 2
    assert view._inbox.qsize() <= 10


async def test_an_unexpected_error_while_applying_is_answered_by_a_resync(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Invariant 5: a delta the view failed to apply is lost, so the view re-reads the
    snapshot; the run loop goes on."""
    rpc = FakeRpc()
    view = await loaded_view(rpc)
    apply = view.state.apply
    calls = 0

    def broken(delta: Delta) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected")
        return apply(delta)

    monkeypatch.setattr(view.state, "apply", broken)
    runner = asyncio.create_task(view.run())
    view._offer(rpc.change(ex.instance("a")))
    await view.wait_for(lambda i: "a" in i, timeout=5)  # by the resync
    assert (view.errors, rpc.reads) == (1, 2)
    view._offer(rpc.change(ex.instance("b")))  # and deltas apply again
    await view.wait_for(lambda i: "b" in i, timeout=5)
    assert view.deltas_applied == 1
    assert not runner.done()
    await view.close()
    async with asyncio.timeout(5):
        await runner


async def test_close_fits_its_end_marker_into_a_full_inbox() -> None:
    rpc = FakeRpc()
    view = await loaded_view(rpc, queue_max=10)
    for i in range(10):
        view._offer(rpc.change(ex.instance(f"i{i}")))
    assert view._inbox.full()
    await view.close()
    async with asyncio.timeout(5):
        await view.run()
