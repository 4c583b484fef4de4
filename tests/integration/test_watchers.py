"""Watchers on fault paths: a bounded inbox, one view per service, a failed watch that
leaves nothing behind, and background failures that stay in the background.

All of them guard invariant 5, "revisions make deltas checkable: a subscriber that sees a
gap re-reads a snapshot": a view may lose deltas (overflow, a bug, a failed start) but must
then re-read a snapshot, never go silently wrong and never take the application down.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aio_pika.abc import AbstractIncomingMessage

from busreg import Registry, Settings
from busreg.client.view import ServiceView
from busreg.errors import RequestTimeout
from busreg.server.worker import Worker
from busreg.testing import running_worker
from busreg.transport.queues import queue_exists
from busreg.wire.models import Delta, Heartbeat

from .helpers import delete_service_exchanges

pytestmark = pytest.mark.servers


def _client(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update={"client": settings.client.model_copy(update=changes)})


async def test_a_flooded_view_stays_bounded_and_resyncs_once_per_overflow(
    busreg_worker: Worker, busreg_namespace: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant 5: a view that cannot keep up drops what it has queued and re-reads a
    snapshot, once per overflow; its inbox never grows past ``watch_queue_max`` and it ends
    equal to a fresh snapshot."""
    bound = 10
    settings = _client(busreg_namespace, watch_queue_max=bound)
    arrived = asyncio.Condition()
    high_water = 0
    top_revision = 0
    on_delta = ServiceView._on_delta

    async def measured(self: ServiceView, message: AbstractIncomingMessage) -> None:
        nonlocal high_water, top_revision
        await on_delta(self, message)
        high_water = max(high_water, self._inbox.qsize())
        top_revision = max(top_revision, Delta.model_validate_json(message.body).revision)
        async with arrived:
            arrived.notify_all()

    monkeypatch.setattr(ServiceView, "_on_delta", measured)  # before the view consumes
    async with Registry(settings) as registry:
        view = await registry.watch("flood")
        resyncs = view.resyncs
        release = asyncio.Event()
        emit = view._emit

        async def stalled(changes: Any) -> None:  # the run loop stops at its first change
            await release.wait()
            await emit(changes)

        monkeypatch.setattr(view, "_emit", stalled)
        n = 4 * bound
        try:
            await asyncio.gather(
                *(
                    registry.register("flood", address=f"127.0.0.1:{9000 + i}", instance_id=f"f{i}")
                    for i in range(n)
                )
            )
            async with asyncio.timeout(10), arrived:
                await arrived.wait_for(lambda: top_revision >= n)  # all reached the view
        finally:
            release.set()  # (also when failing: a stalled view would hold up the close)
        assert high_water <= bound, f"inbox grew to {high_water} (bound {bound})"

        await view.wait_for(lambda i: len(i) == n, timeout=10)
        fresh = await registry.snapshot("flood")
        assert view.revision == fresh.revision == n
        assert view.instances == {i.instance_id: i for i in fresh.instances}
        assert view.overflows >= 1
        assert view.resyncs - resyncs == view.overflows, "one snapshot per overflow"
        assert view._inbox.qsize() <= bound


async def test_concurrent_watches_of_one_service_share_one_view(
    busreg_worker: Worker, busreg_namespace: Settings
) -> None:
    """Invariant 5: a service has one view per registry, so every caller sees the same
    checked revision; no orphaned view is left running to hold up the registry's close."""
    registry = Registry(busreg_namespace)
    try:
        async with asyncio.timeout(10):
            async with registry:
                a, b = await asyncio.gather(registry.watch("x"), registry.watch("x"))
                await asyncio.gather(registry.warm_up("y", "y"), registry.watch("y"))
                views = registry.views
    finally:
        await delete_service_exchanges(busreg_namespace, "x", "y")
    assert a is b
    assert views == {"x": a, "y": views["y"]}


async def test_a_failed_first_watch_leaves_nothing_behind(
    busreg_namespace: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant 5: a view whose first snapshot read failed holds no revision to check
    deltas against; it must close its channel and queue (not stay half-open) and a later
    watch starts a new view from a snapshot."""
    settings = _client(busreg_namespace, request_timeout=1.0)
    started: list[ServiceView] = []
    start = ServiceView.start

    async def recorded(self: ServiceView) -> None:
        started.append(self)
        await start(self)

    monkeypatch.setattr(ServiceView, "start", recorded)
    async with asyncio.timeout(20), Registry(settings) as registry:
        with pytest.raises(RequestTimeout):
            await registry.watch("lonely")  # no worker runs: nobody answers
        [failed] = started
        assert "lonely" not in registry.views
        assert failed._channel is None or failed._channel.is_closed, "channel leaked"
        assert failed._queue is not None
        assert registry._amqp is not None
        assert not await queue_exists(registry._amqp, failed._queue.name), "queue leaked"

        async with running_worker(settings):
            view = await registry.watch("lonely")
            assert view is not failed
            await registry.register("lonely", address="127.0.0.1:7000", instance_id="l1")
            await view.wait_for(lambda i: "l1" in i, timeout=10)


async def _run_app(app: Any) -> Any:
    task = asyncio.create_task(app())
    done, _ = await asyncio.wait([task], timeout=20)
    if not done:
        task.cancel()
        pytest.fail("the application task did not finish")
    assert not task.cancelled(), "a background failure cancelled the application's task"
    return task.result()


async def test_a_failing_view_loop_stays_in_the_background(
    busreg_worker: Worker,
    busreg_namespace: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Invariant 5: a view that failed to apply a delta has lost it, so it re-reads a
    snapshot; the failure is logged, never propagated to the application or other views."""

    async def app() -> str:
        async with Registry(busreg_namespace) as registry:
            alpha = await registry.watch("alpha")
            beta = await registry.watch("beta")
            failed = asyncio.Event()
            apply = alpha.state.apply

            def broken(delta: Delta) -> Any:
                if not failed.is_set():
                    failed.set()
                    raise RuntimeError("injected apply failure")
                return apply(delta)

            monkeypatch.setattr(alpha.state, "apply", broken)
            await registry.register("alpha", address="127.0.0.1:7001", instance_id="a1")
            async with asyncio.timeout(10):
                await failed.wait()
            await registry.register("beta", address="127.0.0.1:7002", instance_id="b1")
            await beta.wait_for(lambda i: "b1" in i, timeout=10)
            await alpha.wait_for(lambda i: "a1" in i, timeout=10)  # re-read the snapshot
            assert alpha.revision == (await registry.snapshot("alpha")).revision
            assert alpha.errors == 1
            return "done"

    assert await _run_app(app) == "done"
    assert "injected apply failure" in caplog.text  # logged, with its traceback


async def test_a_failing_heartbeat_loop_stays_in_the_background(
    busreg_worker: Worker,
    busreg_namespace: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Invariant 5 (its views must keep being fed): an unexpected error in a heartbeat loop
    is logged and the loop restarted; the application and the registry's views run on."""

    async def app() -> str:
        async with Registry(busreg_namespace) as registry:
            view = await registry.watch("gamma")
            reg = await registry.register("gamma", address="127.0.0.1:7003", instance_id="g1")
            publisher = reg._publisher
            heartbeat = publisher.heartbeat
            failed = asyncio.Event()
            beat_again = asyncio.Event()

            async def flaky(event: Heartbeat, timeout: float) -> None:
                if not failed.is_set():
                    failed.set()
                    raise RuntimeError("injected heartbeat failure")
                await heartbeat(event, timeout)
                beat_again.set()

            monkeypatch.setattr(publisher, "heartbeat", flaky)
            async with asyncio.timeout(10):
                await beat_again.wait()
            assert reg.active
            await registry.register("gamma", address="127.0.0.1:7004", instance_id="g2")
            await view.wait_for(lambda i: {"g1", "g2"} <= i.keys(), timeout=10)
            return "done"

    assert await _run_app(app) == "done"
    assert "heartbeats of gamma/g1 failed unexpectedly" in caplog.text
    assert "injected heartbeat failure" in caplog.text
