"""Client-side load balancing over a service's live view (Ribbon's job, without its caches).

A balancer chooses one instance of a service for each call. It reads the instances straight
from a live source (a ``ServiceView``, or anything with an ``instances`` mapping), so a new
instance is chosen as soon as the view has it and a removed one is never chosen again::

    view = await registry.watch("inventory")
    balancer = RoundRobin(view)                       # the default
    balancer = ZoneAware(view, zone="eu-1a")          # prefer callees in the caller's zone
    balancer = LeastOutstanding(view, metadata={"version": "2"})
    instance = balancer.choose()                      # raises NoInstanceAvailable if none

Only instances whose status is UP and that match the ``metadata`` filter (and ``predicate``)
are chosen, minus those in the balancer's **local outlier ejection** table
(``busreg.callers.ejection``): a caller that cannot connect to an instance ejects it at once
(``eject(instance)``) for a back-off, instead of waiting seconds for the registry to expire
it; one whose open connection broke (``suspect``) gets one attempt at a time for a moment.
If *every* eligible instance is ejected, the balancer chooses among the ejected ones rather
than failing the call (``panic=True``, Envoy's panic mode): a local table must never take a
whole service away.

Pure logic, no I/O: the clock is a parameter (``clock=fake_clock`` in tests).
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol, TypedDict, Unpack

from busreg.callers.ejection import EjectionPolicy, EjectionTable
from busreg.errors import NoInstanceAvailable
from busreg.wire.models import Instance, InstanceStatus

__all__ = [
    "BalancerOptions",
    "Clock",
    "InstanceSource",
    "LeastOutstanding",
    "LoadBalancer",
    "NoInstanceAvailable",
    "Random",
    "RoundRobin",
    "Weighted",
    "ZoneAware",
]

#: Seconds from an arbitrary origin, monotonic (``time.monotonic`` by default).
Clock = Callable[[], float]


class InstanceSource(Protocol):
    """Anything with a live ``instances`` mapping (``ServiceView`` is one)."""

    @property
    def instances(self) -> Mapping[str, Instance]: ...


class BalancerOptions(TypedDict, total=False):
    """Keyword options every balancer accepts (see ``LoadBalancer``)."""

    metadata: Mapping[str, str] | None
    predicate: Callable[[Instance], bool] | None
    ejection: EjectionPolicy | None
    panic: bool
    clock: Clock
    name: str | None


class LoadBalancer(ABC):
    """Base class: eligibility (UP + filters), ejection and in-flight tracking.

    Subclasses decide which of the candidates to take (``_pick``) and may narrow the
    candidate set first (``_narrow``, used by ``ZoneAware``). A balancer is meant for one
    asyncio event loop; its methods never await, so a choice is atomic.
    """

    def __init__(
        self,
        source: InstanceSource,
        *,
        metadata: Mapping[str, str] | None = None,
        predicate: Callable[[Instance], bool] | None = None,
        ejection: EjectionPolicy | None = None,
        panic: bool = True,
        clock: Clock = time.monotonic,
        name: str | None = None,
    ) -> None:
        self.source = source
        self.metadata = dict(metadata or {})
        self.predicate = predicate
        self._ejections = EjectionTable(ejection)
        self.panic = panic
        self.clock = clock
        self.name = name or str(getattr(source, "service", "service"))
        self._outstanding: dict[str, int] = {}
        self._next = 0  # rotation counter of round-robin style choices
        self._cache_key: tuple[object, object] | None = None
        self._cache: list[Instance] = []
        #: Choices made while every eligible instance was ejected (panic mode).
        self.panics = 0

    # --- eligibility ------------------------------------------------------------------------

    def _matches(self, instance: Instance) -> bool:
        if instance.status is not InstanceStatus.UP:
            return False
        meta = instance.metadata
        if any(meta.get(key) != value for key, value in self.metadata.items()):
            return False
        return self.predicate is None or self.predicate(instance)

    def eligible(self) -> list[Instance]:
        """UP instances matching the filters, ejected or not, sorted by instance id.

        A source with ``epoch`` and ``revision`` (a ``ServiceView``) is read again only when
        they change (every visible change bumps the revision), so a choice costs O(1) rather
        than O(instances) while the service is stable; ``predicate`` is therefore evaluated
        when the view changes, not on every call. Do not modify the returned list."""
        revision = getattr(self.source, "revision", None)
        key = None if revision is None else (getattr(self.source, "epoch", None), revision)
        if key is not None and key == self._cache_key:
            return self._cache
        found = [i for i in self.source.instances.values() if self._matches(i)]
        found.sort(key=lambda i: i.instance_id)
        self._cache_key, self._cache = key, found
        return found

    def _avoided(self, instance: Instance, now: float) -> bool:
        if self.is_ejected(instance, now):
            return True
        return self.is_suspect(instance, now) and self.outstanding(instance) > 0

    def healthy(self) -> list[Instance]:
        """Eligible instances that are neither ejected nor suspect with a probe in flight."""
        now = self.clock()
        return [i for i in self.eligible() if not self._avoided(i, now)]

    # --- choosing ---------------------------------------------------------------------------

    def choose(self, *, exclude: Collection[str] = ()) -> Instance:
        """One instance for the next attempt, preferring ids not in ``exclude`` (the ones a
        call already tried); reuses a tried one only if nothing else is left."""
        eligible = self.eligible()
        if not eligible:
            raise NoInstanceAvailable(self._explain())
        pool = eligible
        if self._ejections:  # only with records is there anything to filter out
            now = self.clock()
            pool = [i for i in eligible if not self._avoided(i, now)]
            if not pool:
                if not self.panic:
                    raise NoInstanceAvailable(self._explain())
                self.panics += 1
                pool = eligible
        preferred = self._narrow(pool, eligible)
        if not exclude:
            return self._pick(preferred)
        for group in (preferred, pool):
            fresh = [i for i in group if i.instance_id not in exclude]
            if fresh:
                return self._pick(fresh)
        return self._pick(preferred)

    def _narrow(self, pool: list[Instance], eligible: list[Instance]) -> list[Instance]:
        """The subset to prefer (all of ``pool`` by default)."""
        return pool

    @abstractmethod
    def _pick(self, candidates: Sequence[Instance]) -> Instance:
        """The policy: one of ``candidates`` (never empty)."""

    def _explain(self) -> str:
        instances = list(self.source.instances.values())
        up = [i for i in instances if i.status is InstanceStatus.UP]
        matching = [i for i in up if self._matches(i)]
        ejected = [i for i in matching if self.is_ejected(i)]
        parts = [f"{len(instances)} registered", f"{len(up)} UP"]
        if self.metadata or self.predicate is not None:
            parts.append(f"{len(matching)} matching {self.metadata or 'the predicate'}")
        if ejected:
            parts.append(f"{len(ejected)} ejected after connect failures")
        return f"no instance of {self.name!r} available ({', '.join(parts)})"

    # --- ejection (delegated to the EjectionTable) -------------------------------------------

    @property
    def ejection(self) -> EjectionPolicy:
        """The back-off of ejections and the length of suspicions."""
        return self._ejections.policy

    @ejection.setter
    def ejection(self, policy: EjectionPolicy) -> None:
        self._ejections.policy = policy

    @property
    def _ejected(self) -> Mapping[str, object]:
        # the ejection records kept (ended ones until pruned): for tests and debugging
        return self._ejections.records

    def is_ejected(self, instance: Instance, now: float | None = None) -> bool:
        """Whether this caller currently avoids ``instance``.

        A record for an older incarnation is dropped: the registry announced a new run."""
        return self._ejections.is_ejected(instance, self.clock() if now is None else now)

    def is_suspect(self, instance: Instance, now: float | None = None) -> bool:
        """Whether ``instance`` is only probed (one attempt at a time) after a broken
        connection."""
        return self._ejections.is_suspect(instance, self.clock() if now is None else now)

    def eject(self, instance: Instance, until: float | None = None) -> float:
        """Avoid ``instance`` (after a connect failure) until ``until`` on this balancer's
        clock; by default for the back-off of its consecutive failures. Returns ``until``."""
        return self._ejections.eject(instance, self.clock(), self.source.instances, until)

    def suspect(self, instance: Instance, until: float | None = None) -> None:
        """An open connection to ``instance`` broke: probe it with one attempt at a time
        until a success, a failed connect (ejection) or ``until`` (default: now +
        ``ejection.suspicion``), so calls dispatched meanwhile do not all hit a dead port."""
        self._ejections.suspect(instance, self.clock(), until)

    def reinstate(self, instance: Instance) -> None:
        """Forget ``instance``'s ejection, suspicion and failures now."""
        self._ejections.reinstate(instance)

    def record_success(self, instance: Instance) -> None:
        """A call reached ``instance``: it is reinstated and its failure count starts again."""
        self._ejections.reinstate(instance)

    def ejected(self) -> dict[str, float]:
        """Instance id -> end of its ejection, for instances ejected right now."""
        return self._ejections.ejected(self.clock(), self.source.instances)

    # --- in-flight tracking -----------------------------------------------------------------

    def started(self, instance: Instance) -> None:
        """An attempt on ``instance`` began (pair with ``finished``)."""
        self._outstanding[instance.instance_id] = self._outstanding.get(instance.instance_id, 0) + 1

    def finished(self, instance: Instance) -> None:
        """An attempt on ``instance`` ended (response closed or failed)."""
        left = self._outstanding.get(instance.instance_id, 0) - 1
        if left > 0:
            self._outstanding[instance.instance_id] = left
        else:
            self._outstanding.pop(instance.instance_id, None)

    def outstanding(self, instance: Instance) -> int:
        """Attempts in flight on ``instance`` from this balancer's caller."""
        return self._outstanding.get(instance.instance_id, 0)


class RoundRobin(LoadBalancer):
    """Each instance in turn (ordered by instance id). The default, as in Ribbon.

    Usage::

        RoundRobin(view, metadata={"version": "2"})
    """

    def _pick(self, candidates: Sequence[Instance]) -> Instance:
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen


class ZoneAware(RoundRobin):
    """Round robin within the caller's zone while the zone is healthy, else over all zones.

    The zone is healthy while it has at least ``min_healthy`` healthy (UP, matching, not
    ejected) instances and at least ``min_healthy_fraction`` of its eligible instances are
    healthy; otherwise calls spill over to every zone (Ribbon's zone avoidance, which
    abandons a zone only once it has nothing left, is ``min_healthy=1`` and the default).

        ZoneAware(view, zone="eu-1a", min_healthy=2, min_healthy_fraction=0.5)
    """

    def __init__(
        self,
        source: InstanceSource,
        *,
        zone: str,
        min_healthy: int = 1,
        min_healthy_fraction: float = 0.0,
        **options: Unpack[BalancerOptions],
    ) -> None:
        if min_healthy < 1 or not 0.0 <= min_healthy_fraction <= 1.0:
            raise ValueError("ZoneAware needs min_healthy >= 1 and 0 <= min_healthy_fraction <= 1")
        super().__init__(source, **options)
        self.zone = zone
        self._local_of: list[Instance] | None = None
        self._local_cache: list[Instance] = []
        self.min_healthy = min_healthy
        self.min_healthy_fraction = min_healthy_fraction
        #: Choices that left the caller's zone because it was not healthy enough.
        self.spillovers = 0

    def _local(self, instances: list[Instance]) -> list[Instance]:
        # the eligible list is cached while the view is unchanged: so is its local part
        if instances is self._local_of:
            return self._local_cache
        local = [i for i in instances if i.zone == self.zone]
        self._local_of, self._local_cache = instances, local
        return local

    def zone_healthy(self, pool: list[Instance], eligible: list[Instance]) -> bool:
        """Whether calls stay in the caller's zone, given the healthy ``pool``."""
        total = len(self._local(eligible))
        local = total if pool is eligible else sum(1 for i in pool if i.zone == self.zone)
        return (
            local >= self.min_healthy and total > 0 and local >= self.min_healthy_fraction * total
        )

    def _narrow(self, pool: list[Instance], eligible: list[Instance]) -> list[Instance]:
        if self.zone_healthy(pool, eligible):
            if pool is eligible:
                return self._local(eligible)
            return [i for i in pool if i.zone == self.zone]
        self.spillovers += 1
        return pool


class Random(LoadBalancer):
    """A uniformly random instance (``rng`` for reproducible tests).

    Usage::

        Random(view, rng=random.Random(7))
    """

    def __init__(
        self,
        source: InstanceSource,
        *,
        rng: random.Random | None = None,
        **options: Unpack[BalancerOptions],
    ) -> None:
        super().__init__(source, **options)
        self.rng = rng or random.Random()

    def _pick(self, candidates: Sequence[Instance]) -> Instance:
        return self.rng.choice(candidates)


class LeastOutstanding(LoadBalancer):
    """The instance with the fewest attempts in flight from this caller; ties in turn.

    The caller reports attempts with ``started``/``finished`` (the httpx transport does).
    Above ``exact_up_to`` candidates it compares two random ones ("power of two choices"),
    which keeps a choice O(1) and spreads load almost as well.

        LeastOutstanding(view)
    """

    def __init__(
        self,
        source: InstanceSource,
        *,
        exact_up_to: int = 32,
        rng: random.Random | None = None,
        **options: Unpack[BalancerOptions],
    ) -> None:
        super().__init__(source, **options)
        self.exact_up_to = exact_up_to
        self.rng = rng or random.Random()

    def _pick(self, candidates: Sequence[Instance]) -> Instance:
        n = len(candidates)
        if n > self.exact_up_to:
            a, b = self.rng.sample(range(n), 2)
            first, second = candidates[a], candidates[b]
            return second if self.outstanding(second) < self.outstanding(first) else first
        start = self._next % n
        self._next += 1
        best = candidates[start]
        least = self.outstanding(best)
        for k in range(1, n):
            if least == 0:
                break
            other = candidates[(start + k) % n]
            count = self.outstanding(other)
            if count < least:  # strictly fewer: the first of equal ones (in turn) wins
                best, least = other, count
        return best


class Weighted(LoadBalancer):
    """Smooth weighted round robin (nginx's) by the instance's ``metadata["weight"]``.

    A weight is a non-negative number (default 1, unparsable counts as 1); weight 0 drains
    the instance (chosen only if every candidate has weight 0).

        Weighted(view)          # register with metadata={"weight": "3"} for 3x the calls
    """

    def __init__(
        self,
        source: InstanceSource,
        *,
        weight_key: str = "weight",
        **options: Unpack[BalancerOptions],
    ) -> None:
        super().__init__(source, **options)
        self.weight_key = weight_key
        self._current: dict[str, float] = {}

    def weight(self, instance: Instance) -> float:
        raw = instance.metadata.get(self.weight_key)
        if raw is None:
            return 1.0
        try:
            value = float(raw)
        except ValueError:
            return 1.0
        return value if value >= 0 and value == value and value != float("inf") else 1.0

    def _pick(self, candidates: Sequence[Instance]) -> Instance:
        weights = {i.instance_id: self.weight(i) for i in candidates}
        if not any(weights.values()):
            weights = dict.fromkeys(weights, 1.0)
        for iid in [i for i in self._current if i not in weights]:
            del self._current[iid]
        total = sum(weights.values())
        best: Instance | None = None
        for inst in candidates:
            w = weights[inst.instance_id]
            if w <= 0:
                continue
            cw = self._current.get(inst.instance_id, 0.0) + w
            self._current[inst.instance_id] = cw
            if best is None or cw > self._current[best.instance_id]:
                best = inst
        assert best is not None  # some weight is positive
        self._current[best.instance_id] -= total
        return best
