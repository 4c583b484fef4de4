"""The gateway catalog's pure parts, without I/O: counting, Consul-style answer indexes,
the change log and SSE resume, bounded stream queues, the stream bound."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from busreg.client.registry import Registry
from busreg.client.revisions import Change, ViewState
from busreg.client.view import ServiceView
from busreg.gateway.catalog import AnswerIndex, Catalog, Event, StreamsFull, Subscriber, count_by
from busreg.settings import GatewaySettings
from busreg.wire.models import DeltaKind, Instance, InstanceStatus


def inst(iid: str, *, zone: str = "z1", status: str = "UP", inc: int = 1) -> Instance:
    return Instance(
        service="svc",
        instance_id=iid,
        incarnation=inc,
        address=f"10.0.0.1:{8000 + len(iid)}",
        zone=zone,
        status=InstanceStatus(status),
    )


@dataclass
class FakeView:
    """What the catalog reads of a ServiceView."""

    service: str = "svc"
    epoch: str | None = "e1"
    revision: int = 0
    instances: dict[str, Instance] = field(default_factory=dict)

    @property
    def state(self) -> ViewState:
        state = ViewState(self.service)
        state.epoch, state.revision, state.instances = self.epoch, self.revision, self.instances
        return state


def catalog(**settings: Any) -> Catalog:
    return Catalog(cast(Registry, None), GatewaySettings(**settings), clock=lambda: 1000.0)


def apply(
    cat: Catalog, view: FakeView, kind: DeltaKind, i: Instance, reason: str | None = None
) -> None:
    view.revision += 1
    if kind is DeltaKind.REMOVED:
        view.instances.pop(i.instance_id, None)
    else:
        view.instances[i.instance_id] = i
    change = Change(kind, view.service, view.revision, i, reason)
    cat._apply(view.service, change, cast(ServiceView, view))


def test_count_by_status_and_zone() -> None:
    items = [inst("a"), inst("b", zone="z2", status="DOWN"), inst("c", zone="z2")]
    assert count_by(items, "status") == {"DOWN": 1, "UP": 2}
    assert count_by(items, "zone") == {"z1": 1, "z2": 2}
    assert count_by([], "zone") == {}


def test_answer_index_moves_exactly_when_the_answer_changes() -> None:
    index = AnswerIndex()
    assert index.index("k", b"A", 5) == 5
    assert index.index("k", b"A", 9) == 5  # same content: same index, however much else moved
    assert index.index("k", b"B", 12) == 12
    assert index.index("other", b"A", 0) == 1  # never below 1
    assert index.index("k", b"A", 13) == 13  # back to an older content is still a change


def test_answer_index_never_goes_back_when_keys_are_forgotten() -> None:
    index = AnswerIndex(max_keys=2)
    seen: dict[str, list[int]] = {}
    generation = 1
    for step in range(50):
        generation += step % 3  # sometimes nothing moved
        key = f"k{step % 5}"
        seen.setdefault(key, []).append(index.index(key, bytes([step % 4]), generation))
    assert len(index) == 2
    for values in seen.values():
        assert values == sorted(values)


def test_changes_are_counted_logged_and_bounded() -> None:
    cat = catalog(changes_kept=10)
    view = FakeView()
    cat._add_entry(cast(ServiceView, view))
    for n in range(15):
        apply(cat, view, DeltaKind.ADDED, inst(f"i{n}", zone="z2" if n % 2 else "z1"))
    apply(cat, view, DeltaKind.REMOVED, inst("i0"), "expired")
    assert cat.seq == 16
    assert len(cat.changes) == 10
    assert [c["seq"] for c in cat.recent(3)] == [14, 15, 16]
    last = cat.changes[-1]
    assert (last["kind"], last["reason"], last["revision"], last["epoch"]) == (
        "removed",
        "expired",
        16,
        "e1",
    )
    summary = cat.services()[0]
    assert summary["instances"] == 14
    assert summary["by_zone"] == {"z1": 7, "z2": 7}
    assert summary["revision"] == 16


def test_resume_gives_the_held_deltas_or_none() -> None:
    cat = catalog(changes_kept=10)
    view = FakeView()
    cat._add_entry(cast(ServiceView, view))
    for n in range(15):
        apply(cat, view, DeltaKind.ADDED, inst(f"i{n}"))
    assert cat.resume("svc", 15) == []  # up to date
    assert [c["revision"] for c in cat.resume("svc", 12) or []] == [13, 14, 15]
    assert [c["revision"] for c in cat.resume("svc", 5) or []] == list(range(6, 16))
    assert cat.resume("svc", 4) is None  # revision 5 is no longer held: a snapshot
    assert cat.resume("svc", 16) is None  # ahead of us (another epoch, a restart)
    assert cat.resume("nosuch", 1) is None


def test_a_new_service_after_the_first_listing_is_news() -> None:
    cat = catalog()
    cat._add_entry(cast(ServiceView, FakeView("old", revision=1, instances={"a": inst("a")})))
    assert cat.seq == 0  # the first listing is what the first state shows
    cat.loaded.set()
    sub = cat.subscribe(None, "test")
    cat._add_entry(cast(ServiceView, FakeView("new", revision=2, instances={"b": inst("b")})))
    assert cat.seq == 1
    assert cat.changes[-1]["kind"] == "added"
    assert cat.changes[-1]["service"] == "new"
    assert sub._queue.qsize() == 1


def test_instance_times_follow_incarnations() -> None:
    clock = [100.0]
    cat = Catalog(cast(Registry, None), GatewaySettings(), clock=lambda: clock[0])
    view = FakeView()
    cat._add_entry(cast(ServiceView, view))
    apply(cat, view, DeltaKind.ADDED, inst("a"))
    clock[0] = 200.0
    apply(cat, view, DeltaKind.MODIFIED, inst("a", status="DOWN"))
    assert (cat.entries["svc"].json["a"]["since"], cat.entries["svc"].json["a"]["changed"]) == (
        100.0,
        200.0,
    )
    clock[0] = 300.0
    apply(cat, view, DeltaKind.MODIFIED, inst("a", inc=2))  # restarted: a new incarnation
    assert cat.entries["svc"].json["a"]["since"] == 300.0


async def test_a_slow_stream_is_dropped_not_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    sub = Subscriber("svc", 10, "10.0.0.9:5555")
    event = Event("change", b"{}", "svc", 1, 1)
    sub.offer(Event("change", b"{}", "elsewhere", 1, 1))  # another service: not queued
    with caplog.at_level(logging.WARNING, "busreg.gateway.catalog"):
        for _ in range(11):
            sub.offer(event)
    assert sub.dropped
    assert "10.0.0.9:5555 fell 10 events behind; disconnecting it" in caplog.text
    assert await sub.get(1) is None  # the stream ends at once, the backlog discarded
    sub.offer(event)  # later events are ignored
    with pytest.raises(TimeoutError):
        await sub.get(0.01)


def test_the_number_of_streams_is_bounded() -> None:
    cat = catalog(max_streams=2, max_connections=10)
    a = cat.subscribe(None, "a")
    cat.subscribe("svc", "b")
    with pytest.raises(StreamsFull):
        cat.subscribe(None, "c")
    cat.unsubscribe(a)
    cat.subscribe(None, "c")
    assert cat.streams == 2


async def test_wait_mutation_wakes_on_a_change_or_times_out() -> None:
    cat = catalog()
    generation = cat.generation
    assert not await cat.wait_mutation(generation, 0.01)
    waiter = asyncio.create_task(cat.wait_mutation(generation, 5))
    await asyncio.sleep(0)  # let it start waiting (ordering, not timing)
    cat._add_entry(cast(ServiceView, FakeView()))
    assert await waiter
    assert await cat.wait_mutation(generation, 0)  # already past: no wait


async def test_closing_ends_even_a_full_stream() -> None:
    sub = Subscriber(None, 10, "peer")
    for n in range(10):
        sub.offer(Event("change", b"{}", "svc", n, n))
    sub.close()  # shutdown: a backed-up stream must end too, not hold the server open
    assert await sub.get(1) is None
