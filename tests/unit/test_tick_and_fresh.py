"""Pure pieces of the partition runner: when a quiet partition is ticked (TickPlan) and
which applied outbox entries go out without being read back (take_fresh)."""

from __future__ import annotations

import doctest
from collections import deque

import pytest

from busreg import constants as c
from busreg.server import runner, tickplan
from busreg.server.runner import take_fresh
from busreg.server.tickplan import TickPlan


@pytest.mark.parametrize("module", [runner, tickplan])
def test_doctests(module: object) -> None:
    assert doctest.testmod(module).failed == 0  # type: ignore[arg-type]


PLAN = TickPlan(min_spacing=0.1, max_step=1.0)


def test_a_partition_without_leases_is_only_probed() -> None:
    assert PLAN.quiet_for(-1) == c.IDLE_PROBE_INTERVAL
    assert PLAN.silence_limit(-1) == 2 * c.IDLE_PROBE_INTERVAL


def test_a_lease_due_soon_is_ticked_just_after_its_deadline() -> None:
    assert PLAN.quiet_for(300) == pytest.approx(0.3 + c.DUE_TICK_MARGIN)
    # quiet for 0.2 s already: the tick is due in the rest of it
    assert PLAN.delay(300, quiet=0.2, since_tick=5.0) == pytest.approx(0.1 + c.DUE_TICK_MARGIN)


def test_leases_far_from_due_still_get_a_tick_every_half_clock_step() -> None:
    # a longer gap would read as an ingest outage and open the grace
    assert PLAN.quiet_for(60_000) == 0.5
    assert PLAN.quiet_for(None) == 0.5  # not known yet: as if leases lived


def test_ticks_never_come_closer_than_the_tick_interval() -> None:
    assert PLAN.quiet_for(0) == 0.1
    assert PLAN.delay(0, quiet=5.0, since_tick=0.02) == pytest.approx(0.08)
    assert PLAN.delay(0, quiet=5.0, since_tick=1.0) == 0.0


def test_fresh_entries_are_taken_only_from_where_the_drain_stands() -> None:
    fresh = deque([(5, (b"e5", b"e6")), (7, (b"e7",))])
    assert take_fresh(fresh, 5, limit=10) == (5, [b"e5", b"e6", b"e7"])
    assert not fresh


def test_entries_already_read_back_are_skipped() -> None:
    fresh = deque([(5, (b"e5", b"e6")), (7, (b"e7", b"e8"))])
    assert take_fresh(fresh, 8, limit=10) == (8, [b"e8"])


def test_a_gap_or_an_unknown_position_means_reading_the_outbox() -> None:
    fresh = deque([(9, (b"e9",))])
    assert take_fresh(fresh, 7, limit=10) is None  # entries 7 and 8 are not held
    assert not fresh
    fresh = deque([(0, (b"e0",))])
    assert take_fresh(fresh, -1, limit=10) is None  # nothing read yet
    fresh = deque([(0, (b"e0",)), (2, (b"e2",))])  # a hole at 1
    assert take_fresh(fresh, 0, limit=10) == (0, [b"e0"])
    assert take_fresh(fresh, 1, limit=10) is None


def test_at_most_a_batch_is_taken_and_the_rest_is_kept_in_order() -> None:
    fresh = deque([(0, (b"a", b"b", b"c")), (3, (b"d",))])
    assert take_fresh(fresh, 0, limit=2) == (0, [b"a", b"b"])
    assert take_fresh(fresh, 2, limit=2) == (2, [b"c", b"d"])
    assert not fresh
