"""What the multi-process fault tests know to be true, and what they count against it."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from busreg import DeltaKind
from busreg.client.registration import Registration


@dataclass
class Fleet:
    """What the test knows to be true: which instances are alive, and since when."""

    alive: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (service, since)
    ended: dict[str, float] = field(default_factory=dict)  # id -> when it stopped
    heartbeating: set[str] = field(default_factory=set)  # alive and never abandoned
    regs: dict[str, Registration] = field(default_factory=dict)


@dataclass
class Tally:
    revisions: set[tuple[str, str, int]] = field(default_factory=set)  # service, epoch, rev
    false_expiries: list[str] = field(default_factory=list)
    phantom_adds: list[str] = field(default_factory=list)
    missing_live: list[str] = field(default_factory=list)
    removed_seen: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    contents: dict[tuple[str, str, int], str] = field(default_factory=dict)
    #: one (service, epoch, revision) delivered with two different contents
    conflicts: list[str] = field(default_factory=list)

    def record(self, service: str, epoch: str, revision: int, content: str) -> None:
        key = (service, epoch, revision)
        self.revisions.add(key)
        seen = self.contents.setdefault(key, content)
        if seen != content:
            self.conflicts.append(f"{key}: {seen} / {content}")


def judge(fleet: Fleet, tally: Tally, who: str, kind: DeltaKind, iid: str, reason: str) -> None:
    now = time.monotonic()
    if kind is DeltaKind.ADDED:
        ended = fleet.ended.get(iid)
        # a correct registry may still list a dead instance until its TTL ran out
        dead_long = ended is not None and now > ended + 3.0 + 3.0
        if dead_long or iid in tally.removed_seen[who]:
            tally.phantom_adds.append(f"{who}: {iid} @{now:.2f}")
    elif kind is DeltaKind.REMOVED:
        tally.removed_seen[who].add(iid)
        if iid in fleet.heartbeating:
            (tally.false_expiries if reason == "expired" else tally.missing_live).append(
                f"{who}: {iid} ({reason}) @{now:.2f}"
            )
