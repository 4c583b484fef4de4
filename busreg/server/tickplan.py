"""When a quiet partition needs a tick (pure: no I/O).

A partition's lease clock moves only with the broker timestamps of what its owner consumes,
so a partition with no traffic needs ticks for two things, and only for them:

* **expiry**: a lease can only expire once a tick newer than its deadline has been consumed.
  The owner learns from every apply (``ApplyResult.due``) how much partition clock is left
  until the first lease falls due (or the outage grace ends), and ticks then, not before;
* **no false outage**: while leases live, two events more than ``max_clock_step`` apart
  read as an ingest outage and open the grace, so a quiet partition with leases is ticked
  at least every half step.

A partition with no live lease needs neither: nothing can expire and a gap opens no grace
(apply.lua). It still gets a slow *probe* tick, which proves its subscription alive (the
owner's watchdog compares what the broker confirmed with what was delivered).

Ticking ten times a second into every quiet partition, as before, cost an idle namespace
(8 partitions, no instances) 7.7 % of a core in broker, worker and Redis together.
"""

from __future__ import annotations

from dataclasses import dataclass

from busreg import constants as c

__all__ = ["TickPlan"]


@dataclass(frozen=True, slots=True)
class TickPlan:
    """How long a partition may stay quiet before its owner ticks it.

    >>> plan = TickPlan(min_spacing=0.1, max_step=1.0)
    >>> plan.quiet_for(due_ms=-1)     # no live lease: a probe now and then
    5.0
    >>> plan.quiet_for(due_ms=120)    # a lease falls due in 120 ms of partition clock
    0.125
    >>> plan.quiet_for(due_ms=2500)   # leases, none due soon: every half clock step
    0.5
    """

    #: never tick more often than this (``worker.tick_interval``)
    min_spacing: float
    #: ``worker.max_clock_step``
    max_step: float
    probe: float = c.IDLE_PROBE_INTERVAL

    def quiet_for(self, due_ms: int | None) -> float:
        """Seconds of quiet after which a tick is due; ``due_ms`` from the last apply
        (None: not known yet, as if leases lived)."""
        if due_ms is not None and due_ms < 0:
            return self.probe
        bound = self.max_step / 2
        if due_ms is not None:
            # a tick written just after the deadline: its broker timestamp passes it
            bound = min(bound, due_ms / 1000 + c.DUE_TICK_MARGIN)
        return max(self.min_spacing, bound)

    def delay(self, due_ms: int | None, quiet: float, since_tick: float) -> float:
        """Seconds from now until the next tick, for a partition quiet for ``quiet`` s
        whose last tick went ``since_tick`` s ago (0: tick now)."""
        return max(0.0, self.quiet_for(due_ms) - quiet, self.min_spacing - since_tick)

    def silence_limit(self, due_ms: int | None) -> float:
        """How long a subscription may deliver nothing while our ticks are confirmed before
        it is taken for dead: two tick spacings, and never under SUBSCRIPTION_SILENCE."""
        return max(c.SUBSCRIPTION_SILENCE, 2 * self.quiet_for(due_ms))
