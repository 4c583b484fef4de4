"""busreg.client.revisions.ViewState: snapshot + deltas, duplicates, gaps, epochs (inv. 5)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from busreg.client.revisions import Change, Outcome, ViewState
from busreg.wire.models import Delta, DeltaKind, Instance, InstanceStatus, Snapshot

from . import examples as ex

SERVICE = "inventory"


def snap(revision: int, *instances: Instance, epoch: str = "e1") -> Snapshot:
    return Snapshot(service=SERVICE, epoch=epoch, revision=revision, instances=list(instances))


def delta(
    revision: int,
    inst: Instance,
    kind: DeltaKind = DeltaKind.ADDED,
    *,
    epoch: str = "e1",
    reason: str | None = None,
    service: str = SERVICE,
) -> Delta:
    return Delta.model_validate(
        {
            "kind": kind,
            "service": service,
            "epoch": epoch,
            "revision": revision,
            "instance": inst.model_dump(),
            "reason": reason,
        }
    )


A, B, C = ex.instance("a"), ex.instance("b"), ex.instance("c")


def loaded(revision: int = 5, *instances: Instance) -> ViewState:
    state = ViewState(SERVICE)
    state.load(snap(revision, *instances))
    return state


# --- load -------------------------------------------------------------------------------------


def test_fresh_state_is_not_loaded_and_any_delta_is_a_gap() -> None:
    state = ViewState(SERVICE)
    assert not state.loaded
    assert state.revision == -1
    assert state.apply(delta(1, A)) == (Outcome.GAP, None)
    assert state.instances == {}


def test_first_load_reports_every_instance_as_added() -> None:
    state = ViewState(SERVICE)
    changes = state.load(snap(7, A, B))
    assert state.loaded
    assert (state.epoch, state.revision) == ("e1", 7)
    assert state.instances == {"a": A, "b": B}
    assert sorted((c.kind, c.instance_id, c.revision, c.reason) for c in changes) == [
        (DeltaKind.ADDED, "a", 7, "resync"),
        (DeltaKind.ADDED, "b", 7, "resync"),
    ]


def test_reload_reports_only_the_differences() -> None:
    state = loaded(5, A, B, C)
    b2 = ex.instance("b", status=InstanceStatus.DOWN)
    d = ex.instance("d")
    changes = state.load(snap(9, b2, C, d))
    assert {(c.kind, c.instance_id): c.instance for c in changes} == {
        (DeltaKind.REMOVED, "a"): A,
        (DeltaKind.MODIFIED, "b"): b2,
        (DeltaKind.ADDED, "d"): d,
    }
    assert all(c.reason == "resync" and c.revision == 9 for c in changes)
    assert state.instances == {"b": b2, "c": C, "d": d}
    assert state.revision == 9


def test_reload_of_the_same_snapshot_reports_nothing() -> None:
    state = loaded(5, A, B)
    assert state.load(snap(5, A, B)) == []


def test_load_of_another_service_is_refused() -> None:
    state = ViewState(SERVICE)
    other = Snapshot(service="orders", epoch="e1", revision=1, instances=[])
    with pytest.raises(ValueError, match="orders"):
        state.load(other)
    assert not state.loaded


# --- apply ------------------------------------------------------------------------------------


def test_deltas_apply_in_order() -> None:
    state = loaded(5, A)
    a2 = ex.instance("a", metadata={"version": "3"})
    outcome, change = state.apply(delta(6, B))
    assert outcome is Outcome.APPLIED
    assert change == Change(DeltaKind.ADDED, SERVICE, 6, B, None)
    outcome, change = state.apply(delta(7, a2, DeltaKind.MODIFIED))
    assert outcome is Outcome.APPLIED
    assert change == Change(DeltaKind.MODIFIED, SERVICE, 7, a2, None)
    assert state.revision == 7
    assert state.instances == {"a": a2, "b": B}


def test_removed_delta_removes_and_keeps_its_reason() -> None:
    state = loaded(5, A, B)
    outcome, change = state.apply(delta(6, A, DeltaKind.REMOVED, reason="expired"))
    assert outcome is Outcome.APPLIED
    assert change == Change(DeltaKind.REMOVED, SERVICE, 6, A, "expired")
    assert state.instances == {"b": B}
    # removing an unknown instance still moves the revision on
    assert state.apply(delta(7, C, DeltaKind.REMOVED, reason="deregistered"))[0] is Outcome.APPLIED
    assert (state.revision, state.instances) == (7, {"b": B})


@pytest.mark.parametrize("revision", [1, 4, 5, 6])
def test_duplicates_and_older_deltas_are_stale(revision: int) -> None:
    state = loaded(5, A)
    state.apply(delta(6, B))
    before = dict(state.instances)
    assert state.apply(delta(revision, C)) == (Outcome.STALE, None)
    assert state.instances == before
    assert state.revision == 6


def test_skipped_revision_is_a_gap_and_changes_nothing() -> None:
    state = loaded(5, A)
    assert state.apply(delta(7, B)) == (Outcome.GAP, None)
    assert (state.revision, state.instances) == (5, {"a": A})
    # the missing revision still applies afterwards
    assert state.apply(delta(6, C))[0] is Outcome.APPLIED


@pytest.mark.parametrize("revision", [1, 5, 6, 7])
def test_new_epoch_is_a_gap_whatever_the_revision(revision: int) -> None:
    state = loaded(5, A)
    assert state.apply(delta(revision, B, epoch="e2")) == (Outcome.GAP, None)
    assert (state.epoch, state.revision, state.instances) == ("e1", 5, {"a": A})
    # a snapshot of the new epoch starts over, even at a lower revision
    state.load(snap(1, B, epoch="e2"))
    assert state.apply(delta(2, C, epoch="e2"))[0] is Outcome.APPLIED
    assert state.apply(delta(6, C, epoch="e1")) == (Outcome.GAP, None)  # late, old epoch


def test_delta_of_another_service_is_ignored() -> None:
    state = loaded(5, A)
    other = ex.instance("x", service="orders")
    assert state.apply(delta(6, other, service="orders")) == (Outcome.STALE, None)
    assert state.revision == 5


# --- model-based: any delivery order + resync on gap converges to the server -----------------


@dataclass
class Server:
    """The registry as a worker keeps it: revisions per epoch, a delta per visible change."""

    epoch_n: int = 1
    revision: int = 0
    instances: dict[str, Instance] = field(default_factory=dict)
    deltas: list[Delta] = field(default_factory=list)
    #: snapshots[k] = the state right after deltas[k - 1] was published
    snapshots: list[Snapshot] = field(default_factory=list)

    @property
    def epoch(self) -> str:
        return f"e{self.epoch_n}"

    def snapshot(self) -> Snapshot:
        return snap(self.revision, *self.instances.values(), epoch=self.epoch)

    def _publish(self, kind: DeltaKind, inst: Instance, reason: str | None) -> None:
        self.revision += 1
        self.deltas.append(delta(self.revision, inst, kind, epoch=self.epoch, reason=reason))
        self.snapshots.append(self.snapshot())

    def upsert(self, iid: str, variant: int) -> None:
        inst = ex.instance(iid, metadata={"variant": str(variant)})
        old = self.instances.get(iid)
        if old == inst:
            return  # a plain heartbeat: no visible change, no delta
        self.instances[iid] = inst
        self._publish(DeltaKind.MODIFIED if old else DeltaKind.ADDED, inst, None)

    def remove(self, iid: str, reason: str) -> None:
        inst = self.instances.pop(iid, None)
        if inst is not None:
            self._publish(DeltaKind.REMOVED, inst, reason)

    def lose_state(self) -> None:
        """Redis lost the partition: a new epoch, revisions and instances start over."""
        self.epoch_n += 1
        self.revision = 0
        self.instances = {}


operations = st.lists(
    st.one_of(
        st.tuples(st.just("up"), st.sampled_from("abcde"), st.integers(0, 2)),
        st.tuples(
            st.just("rm"), st.sampled_from("abcde"), st.sampled_from(["expired", "deregistered"])
        ),
        st.tuples(st.just("lose"), st.just(""), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=operations, data=st.data())
def test_any_delivery_order_with_resync_converges_to_the_server(
    ops: list[tuple[str, str, object]], data: st.DataObject
) -> None:
    server = Server()
    server.snapshots.append(server.snapshot())
    for op, iid, arg in ops:
        if op == "up":
            server.upsert(iid, int(str(arg)))
        elif op == "rm":
            server.remove(iid, str(arg))
        else:
            server.lose_state()
    n = len(server.deltas)
    # delivery: every delta at least once, in any order, with duplicates
    order = list(data.draw(st.permutations(range(n)), label="order"))
    for dup in data.draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=n), label="dups"):
        if n:
            order.insert(data.draw(st.integers(0, len(order)), label="at"), dup)
    # the view reads its first snapshot at some point of the server's history
    now = data.draw(st.integers(0, n), label="first snapshot after delta")

    view = ViewState(SERVICE)
    mirror: dict[str, Instance] = {}  # what a consumer of the emitted changes would hold

    def emit(changes: list[Change]) -> None:
        for change in changes:
            if change.kind is DeltaKind.REMOVED:
                assert change.instance_id in mirror
                del mirror[change.instance_id]
            else:
                assert (change.instance_id in mirror) == (change.kind is DeltaKind.MODIFIED)
                mirror[change.instance_id] = change.instance

    emit(view.load(server.snapshots[now]))
    for k in order:
        now = max(now, k + 1)  # delta k was published, so the server is at least there
        outcome, change = view.apply(server.deltas[k])
        if outcome is Outcome.GAP:
            # what ServiceView.run does: re-read the snapshot, then retry the delta
            emit(view.load(server.snapshots[now]))
            outcome, change = view.apply(server.deltas[k])
            # after a resync only a delta of an older epoch can still look like a gap
            assert outcome is not Outcome.GAP or server.deltas[k].epoch != view.epoch
        if change is not None:
            emit([change])
        assert mirror == view.instances

    final = server.snapshots[n]  # the state as of the last published delta
    assert view.instances == {i.instance_id: i for i in final.instances}
    assert (view.epoch, view.revision) == (final.epoch, final.revision)
