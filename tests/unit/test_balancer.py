"""Load balancers over a live view: eligibility, zones, strategies, local outlier ejection."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from busreg.callers.balancer import (
    LeastOutstanding,
    LoadBalancer,
    NoInstanceAvailable,
    Random,
    RoundRobin,
    Weighted,
    ZoneAware,
)
from busreg.callers.ejection import EjectionPolicy
from busreg.wire.models import Instance, InstanceStatus


class FakeView:
    """What a balancer reads from a ServiceView: a live ``instances`` dict."""

    def __init__(self, *instances: Instance) -> None:
        self.service = "inventory"
        self.instances: dict[str, Instance] = {i.instance_id: i for i in instances}

    def put(self, instance: Instance) -> None:
        self.instances[instance.instance_id] = instance


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def inst(
    iid: str,
    *,
    zone: str = "default",
    status: InstanceStatus = InstanceStatus.UP,
    incarnation: int = 1,
    port: int | None = None,
    **metadata: str,
) -> Instance:
    return Instance(
        service="inventory",
        instance_id=iid,
        incarnation=incarnation,
        address=f"127.0.0.1:{port or 8000 + sum(map(ord, iid)) % 1000}",
        zone=zone,
        status=status,
        metadata=metadata,
    )


def picks(balancer: LoadBalancer, n: int) -> Counter[str]:
    return Counter(balancer.choose().instance_id for _ in range(n))


# --- round robin and eligibility ---------------------------------------------------------------


def test_round_robin_is_fair_and_ordered() -> None:
    view = FakeView(inst("c"), inst("a"), inst("b"))
    rr = RoundRobin(view)
    assert [rr.choose().instance_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert picks(rr, 3000) == {"a": 1000, "b": 1000, "c": 1000}


def test_round_robin_follows_the_live_view() -> None:
    view = FakeView(inst("a"))
    rr = RoundRobin(view)
    assert picks(rr, 4) == {"a": 4}
    view.put(inst("b"))  # scale out: the very next choices include it
    assert picks(rr, 4) == {"a": 2, "b": 2}
    del view.instances["a"]
    assert picks(rr, 4) == {"b": 4}


def test_only_up_instances_matching_filters_are_chosen() -> None:
    view = FakeView(
        inst("up-v2", version="2"),
        inst("up-v1", version="1"),
        inst("down-v2", status=InstanceStatus.DOWN, version="2"),
        inst("oos-v2", status=InstanceStatus.OUT_OF_SERVICE, version="2"),
        inst("starting-v2", status=InstanceStatus.STARTING, version="2"),
    )
    assert set(picks(RoundRobin(view), 50)) == {"up-v2", "up-v1"}
    assert set(picks(RoundRobin(view, metadata={"version": "2"}), 50)) == {"up-v2"}
    canary = RoundRobin(view, predicate=lambda i: i.metadata.get("version") == "1")
    assert set(picks(canary, 50)) == {"up-v1"}


def test_no_instance_available_says_why() -> None:
    with pytest.raises(NoInstanceAvailable, match=r"'inventory'.*0 registered"):
        RoundRobin(FakeView()).choose()
    view = FakeView(inst("a", status=InstanceStatus.DOWN), inst("b", version="1"))
    with pytest.raises(NoInstanceAvailable, match=r"2 registered, 1 UP, 0 matching"):
        RoundRobin(view, metadata={"version": "2"}).choose()


def test_exclude_prefers_untried_instances_then_reuses() -> None:
    view = FakeView(inst("a"), inst("b"))
    rr = RoundRobin(view)
    for _ in range(10):
        assert rr.choose(exclude=["a"]).instance_id == "b"
    assert rr.choose(exclude=["a", "b"]).instance_id in {"a", "b"}  # nothing untried left


# --- zone awareness ----------------------------------------------------------------------------


def test_zone_aware_keeps_calls_in_zone_while_healthy_then_spills_over() -> None:
    clock = FakeClock()
    a1, a2 = inst("a1", zone="eu-1a"), inst("a2", zone="eu-1a")
    b1, b2, b3 = (inst(f"b{n}", zone="eu-1b") for n in (1, 2, 3))
    view = FakeView(a1, a2, b1, b2, b3)
    za = ZoneAware(view, zone="eu-1a", clock=clock)

    assert picks(za, 1000) == {"a1": 500, "a2": 500}, "in-zone only, evenly"
    assert za.spillovers == 0

    za.eject(a1)  # one local instance fails: the other one still holds the zone
    assert picks(za, 100) == {"a2": 100}

    za.eject(a2)  # the zone has nothing healthy left: spill over to every zone
    spilled = picks(za, 300)
    assert spilled == {"b1": 100, "b2": 100, "b3": 100}
    assert za.spillovers == 300

    clock.now += 5.0  # back-off over: calls return to the zone
    assert set(picks(za, 100)) == {"a1", "a2"}


def test_zone_aware_min_healthy_and_fraction() -> None:
    clock = FakeClock()
    local = [inst(f"a{n}", zone="z1") for n in range(4)]
    remote = [inst(f"b{n}", zone="z2") for n in range(4)]
    view = FakeView(*local, *remote)

    strict = ZoneAware(view, zone="z1", min_healthy=3, clock=clock)
    assert {i[0] for i in picks(strict, 40)} == {"a"}
    strict.eject(local[0])  # 3 healthy left: still in zone
    assert {i[0] for i in picks(strict, 40)} == {"a"}
    strict.eject(local[1])  # 2 < 3: spill over (to the healthy ones of both zones)
    assert set(picks(strict, 60)) == {"a2", "a3", "b0", "b1", "b2", "b3"}

    half = ZoneAware(view, zone="z1", min_healthy_fraction=0.75, clock=clock)
    assert {i[0] for i in picks(half, 40)} == {"a"}
    half.eject(local[0])  # 3 of 4 healthy = 0.75: stays
    assert {i[0] for i in picks(half, 40)} == {"a"}
    half.eject(local[1])  # 2 of 4 < 0.75: spills over
    assert "b0" in picks(half, 60)


def test_zone_aware_with_no_local_instances_uses_every_zone() -> None:
    view = FakeView(inst("b1", zone="z2"), inst("c1", zone="z3"))
    za = ZoneAware(view, zone="z1")
    assert picks(za, 10) == {"b1": 5, "c1": 5}
    # a DOWN local instance does not count as healthy
    view.put(inst("a1", zone="z1", status=InstanceStatus.DOWN))
    assert picks(za, 10) == {"b1": 5, "c1": 5}
    view.put(inst("a1", zone="z1"))  # UP again: the zone is used
    assert picks(za, 10) == {"a1": 10}


def test_zone_aware_retry_goes_to_another_server_even_across_zones() -> None:
    view = FakeView(inst("a1", zone="z1"), inst("b1", zone="z2"))
    za = ZoneAware(view, zone="z1")
    assert za.choose().instance_id == "a1"
    assert za.choose(exclude=["a1"]).instance_id == "b1"


def test_zone_aware_rejects_bad_thresholds() -> None:
    with pytest.raises(ValueError, match="min_healthy"):
        ZoneAware(FakeView(), zone="z", min_healthy=0)
    with pytest.raises(ValueError, match="min_healthy"):
        ZoneAware(FakeView(), zone="z", min_healthy_fraction=1.5)


# --- ejection ------------------------------------------------------------------------------------


def test_ejection_ends_after_the_back_off_which_doubles_per_failure() -> None:
    clock = FakeClock()
    a, b = inst("a"), inst("b")
    rr = RoundRobin(FakeView(a, b), clock=clock, ejection=EjectionPolicy(base=5, maximum=30))
    start = clock.now
    assert rr.eject(a) == start + 5
    assert picks(rr, 10) == {"b": 10}
    assert rr.ejected() == {"a": start + 5}
    clock.now = start + 4.999
    assert rr.is_ejected(a)
    clock.now = start + 5
    assert not rr.is_ejected(a)
    assert set(picks(rr, 10)) == {"a", "b"}, "reinstated when the back-off ended"

    # it fails again: consecutive failures double the back-off, up to the maximum
    backoffs = []
    for _ in range(5):
        backoffs.append(rr.eject(a) - clock.now)
        clock.now += backoffs[-1]
    assert backoffs == [10, 20, 30, 30, 30]

    rr.record_success(a)  # a call got through: the count starts again
    assert rr.eject(a) - clock.now == 5


def test_new_incarnation_reinstates_at_once() -> None:
    clock = FakeClock()
    a, b = inst("a", incarnation=1), inst("b")
    view = FakeView(a, b)
    rr = RoundRobin(view, clock=clock)
    rr.eject(a)
    rr.eject(a)
    assert picks(rr, 6) == {"b": 6}
    view.put(inst("a", incarnation=2))  # the registry announces a new run of "a"
    assert picks(rr, 6) == {"a": 3, "b": 3}
    assert rr.ejected() == {}
    # and its failure count started again
    assert rr.eject(view.instances["a"]) - clock.now == 5


def test_eject_until_an_explicit_time_and_reinstate() -> None:
    clock = FakeClock()
    a, b = inst("a"), inst("b")
    rr = RoundRobin(FakeView(a, b), clock=clock)
    rr.eject(a, until=clock.now + 100)
    clock.now += 99
    assert picks(rr, 4) == {"b": 4}
    rr.reinstate(a)
    assert set(picks(rr, 4)) == {"a", "b"}


def test_every_instance_ejected_panics_instead_of_failing() -> None:
    clock = FakeClock()
    a, b = inst("a"), inst("b")
    rr = RoundRobin(FakeView(a, b), clock=clock)
    rr.eject(a)
    rr.eject(b)
    assert set(picks(rr, 4)) == {"a", "b"}
    assert rr.panics == 4
    strict = RoundRobin(FakeView(a), clock=clock, panic=False)
    strict.eject(a)
    with pytest.raises(NoInstanceAvailable, match="1 ejected"):
        strict.choose()


def test_ejection_records_of_departed_instances_are_pruned() -> None:
    clock = FakeClock()
    view = FakeView(*(inst(f"i{n}") for n in range(100)))
    rr = RoundRobin(view, clock=clock)
    for i in list(view.instances.values()):
        rr.eject(i)
    view.instances.clear()
    view.put(inst("new"))
    clock.now += 10
    rr.eject(view.instances["new"])
    assert len(rr._ejected) == 1


def test_ejection_policy_validation() -> None:
    with pytest.raises(ValueError, match="base"):
        EjectionPolicy(base=0)
    with pytest.raises(ValueError, match="base"):
        EjectionPolicy(base=10, maximum=5)
    assert EjectionPolicy(base=1, maximum=8).backoff(10_000) == 8


# --- other strategies ----------------------------------------------------------------------------


def test_random_chooses_only_healthy_instances_roughly_evenly() -> None:
    clock = FakeClock()
    a, b, c = inst("a"), inst("b"), inst("c")
    rnd = Random(FakeView(a, b, c), rng=random.Random(7), clock=clock)
    counts = picks(rnd, 3000)
    assert set(counts) == {"a", "b", "c"}
    assert all(900 < n < 1100 for n in counts.values())
    rnd.eject(b)
    assert set(picks(rnd, 300)) == {"a", "c"}


def test_least_outstanding_prefers_idle_instances() -> None:
    a, b, c = inst("a"), inst("b"), inst("c")
    lo = LeastOutstanding(FakeView(a, b, c))
    first = [lo.choose() for _ in range(3)]
    for i in first:
        lo.started(i)
    assert {i.instance_id for i in first} == {"a", "b", "c"}  # ties in turn
    lo.started(a)
    lo.started(b)  # a: 2, b: 2, c: 1 in flight
    assert lo.choose().instance_id == "c"
    lo.finished(a)
    lo.finished(a)  # a: 0
    assert lo.choose().instance_id == "a"
    assert lo.outstanding(a) == 0
    lo.finished(a)  # never negative
    assert lo.outstanding(a) == 0


def test_weighted_by_metadata_is_smooth_and_exact() -> None:
    heavy, light = inst("heavy", weight="3"), inst("light", weight="1")
    w = Weighted(FakeView(heavy, light))
    sequence = [w.choose().instance_id for _ in range(8)]
    assert sequence.count("heavy") == 6
    assert "light,light" not in ",".join(sequence)  # smooth: no bursts of the light one
    assert picks(w, 4000) == {"heavy": 3000, "light": 1000}


def test_weighted_zero_drains_and_bad_weights_count_as_one() -> None:
    view = FakeView(inst("drained", weight="0"), inst("bad", weight="x"), inst("nan", weight="nan"))
    w = Weighted(view)
    assert picks(w, 100) == {"bad": 50, "nan": 50}
    only_zero = Weighted(FakeView(inst("z1", weight="0"), inst("z2", weight="0")))
    assert picks(only_zero, 10) == {"z1": 5, "z2": 5}


def test_least_outstanding_uses_two_random_choices_for_many_instances() -> None:
    view = FakeView(*(inst(f"i{n:03}") for n in range(100)))
    lo = LeastOutstanding(view, rng=random.Random(3))
    busy = list(view.instances.values())[:50]
    for i in busy:
        for _ in range(5):
            lo.started(i)
    chosen = Counter(lo.choose().instance_id for _ in range(1000))
    idle_share = sum(n for iid, n in chosen.items() if int(iid[1:]) >= 50) / 1000
    assert idle_share > 0.7  # two random choices: an idle one wins whenever one is drawn


class VersionedView(FakeView):
    """Like a ServiceView: every change bumps ``revision`` (within an ``epoch``)."""

    def __init__(self, *instances: Instance) -> None:
        super().__init__(*instances)
        self.epoch = "e1"
        self.revision = 1
        self.reads = 0

    @property  # type: ignore[override]
    def instances(self) -> dict[str, Instance]:
        self.reads += 1
        return self._instances

    @instances.setter
    def instances(self, value: dict[str, Instance]) -> None:
        self._instances = value

    def change(self, instance: Instance | None = None, remove: str | None = None) -> None:
        if instance is not None:
            self._instances[instance.instance_id] = instance
        if remove is not None:
            del self._instances[remove]
        self.revision += 1


def test_a_versioned_source_is_read_again_only_when_its_revision_changes() -> None:
    clock = FakeClock()
    view = VersionedView(inst("a1", zone="z1"), inst("a2", zone="z1"), inst("b1", zone="z2"))
    za = ZoneAware(view, zone="z1", clock=clock)
    assert picks(za, 100) == {"a1": 50, "a2": 50}
    assert view.reads == 1, "one read for 100 choices while nothing changed"
    view.change(inst("a3", zone="z1"))
    assert picks(za, 30) == {"a1": 10, "a2": 10, "a3": 10}
    assert view.reads == 2
    za.eject(view.instances["a1"])  # ejections apply on top of the cached list
    assert picks(za, 20) == {"a2": 10, "a3": 10}
    view.change(remove="a2")
    view.change(remove="a3")
    assert picks(za, 10) == {"b1": 10}, "a1 ejected and nothing else in z1: spill over"
    view.epoch, view.revision = "e2", 1  # a new epoch may restart revisions
    view.change(inst("a4", zone="z1"))
    assert "a4" in picks(za, 10)


def test_a_suspect_instance_gets_one_attempt_at_a_time_until_it_answers() -> None:
    clock = FakeClock()
    a, b = inst("a"), inst("b")
    rr = RoundRobin(FakeView(a, b), clock=clock)
    rr.suspect(a)  # a connection to it broke: its process may be gone
    probe = next(i for i in (rr.choose() for _ in range(2)) if i.instance_id == "a")
    rr.started(probe)  # the probe is in flight: every other call goes elsewhere
    assert picks(rr, 10) == {"b": 10}
    rr.finished(probe)
    rr.record_success(probe)  # it answered: back to normal
    assert not rr.is_suspect(a)
    assert picks(rr, 10) == {"a": 5, "b": 5}

    rr.suspect(a)
    rr.started(a)
    rr.eject(a)  # the probe's connect failed: ejected, no longer merely suspect
    rr.finished(a)
    assert not rr.is_suspect(a)
    assert picks(rr, 4) == {"b": 4}


def test_suspicion_ends_by_time_and_by_new_incarnation() -> None:
    clock = FakeClock()
    a, b = inst("a"), inst("b")
    view = FakeView(a, b)
    rr = RoundRobin(view, clock=clock, ejection=EjectionPolicy(suspicion=1.0))
    rr.suspect(a)
    rr.started(a)
    assert picks(rr, 4) == {"b": 4}
    clock.now += 1.0
    assert set(picks(rr, 4)) == {"a", "b"}, "suspicion over"
    rr.suspect(a)
    view.put(inst("a", incarnation=2))
    assert set(picks(rr, 4)) == {"a", "b"}, "a new run is not suspect"
    rr.eject(b)
    rr.suspect(b)  # ejection wins over suspicion
    assert not rr.is_suspect(b)
