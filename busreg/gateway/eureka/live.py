"""What the Eureka API reads: the gateway's live views, and a clock for event sequence numbers.

No registry state of its own: every answer is made from H1's ``Catalog`` (one view per
service, with its change log) and, for a service the catalog has not adopted yet (it lists
services every ``gateway.refresh`` seconds), from the ``Registry``'s own view of it, which a
Eureka write opens at once so the writer can read its own write.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from busreg.client.registry import Registry
from busreg.client.view import ServiceView
from busreg.gateway.catalog import Catalog
from busreg.wire.models import Instance

__all__ = ["EventClock", "LiveRegistry", "Seen"]


class EventClock:
    """``seq`` of the events the gateway builds for Eureka clients: microseconds since the
    epoch (< 2^53 until the year 2255), strictly increasing within this process. Events of
    one instance are ordered by ``(incarnation, seq)``, so a renewal after a register (or
    a cancel after a renewal) is newer without the gateway remembering anything per
    instance; gateways behind one load balancer need clocks in step (NTP) for the same."""

    def __init__(self, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._clock_ns = clock_ns
        self._last = 0

    def next(self) -> int:
        self._last = max(self._clock_ns() // 1000, self._last + 1)
        return self._last


@dataclass(frozen=True, slots=True)
class Seen:
    """One instance as the gateway serves it: ``since``/``changed`` are unix seconds (None
    when only the registry's own view knows it so far)."""

    instance: Instance
    since: float | None = None
    changed: float | None = None


class LiveRegistry:
    """Read-only access to the live views, for the Eureka routes."""

    def __init__(self, registry: Registry, catalog: Catalog | None) -> None:
        self.registry = registry
        self.catalog = catalog

    def services(self) -> dict[str, dict[str, Seen]]:
        """service -> instance id -> Seen, for every service known now."""
        out: dict[str, dict[str, Seen]] = {}
        if self.catalog is not None:
            for name, entry in self.catalog.entries.items():
                out[name] = {
                    iid: Seen(inst, entry.since.get(iid), entry.changed.get(iid))
                    for iid, inst in entry.instances.items()
                }
        for name, view in self.registry.views.items():
            if name not in out:
                out[name] = {iid: Seen(inst) for iid, inst in view.state.instances.items()}
        return out

    def pending(self) -> set[str]:
        """Services only the registry's own views know (the catalog adopts them at its
        next listing, and logs their instances as added then)."""
        adopted = set() if self.catalog is None else set(self.catalog.entries)
        return set(self.registry.views) - adopted

    def known(self, service: str, instance_id: str) -> Instance | None:
        """The instance as the registry's view of ``service`` holds it now (the freshest
        copy: the catalog consumes the same view's changes)."""
        view = self.registry.views.get(service)
        return None if view is None else view.state.instances.get(instance_id)

    async def view(self, service: str) -> ServiceView:
        """The live view of ``service``, opened (and loaded) if nobody watches it yet."""
        return await self.registry.watch(service)

    def changes_since(self, at: float) -> list[dict[str, Any]]:
        """The catalog's logged changes at or after ``at`` (unix seconds), oldest first."""
        if self.catalog is None:
            return []
        return [c for c in self.catalog.changes if c["at"] >= at]

    @property
    def change_seq(self) -> int:
        return 0 if self.catalog is None else self.catalog.seq
