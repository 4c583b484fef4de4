"""Revision and gap logic of a watched service: pure, no I/O (invariant 5).

A ``ViewState`` is a service's instance set at (epoch, revision). Deltas move it forward by
exactly one revision; anything else is a duplicate (ignored) or a gap (re-read a snapshot).

    state = ViewState("inventory")
    state.load(snapshot)            # -> changes versus what the view showed before
    outcome, change = state.apply(delta)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from busreg.wire.models import Delta, DeltaKind, Instance, Snapshot

__all__ = ["Change", "Outcome", "ViewState"]


class Outcome(Enum):
    APPLIED = "applied"
    STALE = "stale"  # already seen (duplicate after a retry, or older than the snapshot)
    GAP = "gap"  # a revision is missing or the epoch changed: re-read the snapshot


@dataclass(frozen=True, slots=True)
class Change:
    """One change of a watched service as the local view saw it."""

    kind: DeltaKind
    service: str
    revision: int
    instance: Instance
    reason: str | None = None  # "deregistered" | "expired" | "resync" | None

    @property
    def instance_id(self) -> str:
        return self.instance.instance_id


class ViewState:
    def __init__(self, service: str) -> None:
        self.service = service
        self.epoch: str | None = None
        self.revision = -1
        self.instances: dict[str, Instance] = {}

    @property
    def loaded(self) -> bool:
        return self.epoch is not None

    def load(self, snapshot: Snapshot) -> list[Change]:
        """Replace the view by ``snapshot``; return the differences as changes."""
        if snapshot.service != self.service:
            raise ValueError(f"snapshot of {snapshot.service!r} loaded into {self.service!r}")
        new = {i.instance_id: i for i in snapshot.instances}
        changes: list[Change] = []
        rev = snapshot.revision
        for iid, inst in self.instances.items():
            if iid not in new:
                changes.append(Change(DeltaKind.REMOVED, self.service, rev, inst, "resync"))
        for iid, inst in new.items():
            old = self.instances.get(iid)
            if old is None:
                changes.append(Change(DeltaKind.ADDED, self.service, rev, inst, "resync"))
            elif old != inst:
                changes.append(Change(DeltaKind.MODIFIED, self.service, rev, inst, "resync"))
        self.epoch, self.revision, self.instances = snapshot.epoch, rev, new
        return changes

    def apply(self, delta: Delta) -> tuple[Outcome, Change | None]:
        if delta.service != self.service:
            return Outcome.STALE, None
        if self.epoch is None or delta.epoch != self.epoch:
            return Outcome.GAP, None
        if delta.revision <= self.revision:
            return Outcome.STALE, None
        if delta.revision != self.revision + 1:
            return Outcome.GAP, None
        inst = delta.instance
        if delta.kind is DeltaKind.REMOVED:
            self.instances.pop(inst.instance_id, None)
        else:
            self.instances[inst.instance_id] = inst
        self.revision = delta.revision
        return Outcome.APPLIED, Change(delta.kind, self.service, delta.revision, inst, delta.reason)
