"""Local outlier ejection: which instances one caller avoids for now, and for how long.

``EjectionPolicy`` is the back-off maths; ``EjectionTable`` owns the per-instance state (the
ejections, with their consecutive failure counts, and the suspicions) and its operations.
Every balancer has one table (``LoadBalancer.eject`` and friends delegate to it)::

    table = EjectionTable(EjectionPolicy(base=5.0, maximum=60.0))
    until = table.eject(instance, now=clock(), live=view.instances)  # after a connect failure
    table.is_ejected(instance, now=clock())                          # True until ``until``

A connect failure ejects an instance for the back-off of its consecutive failures (5 s,
10 s, 20 s ... up to 60 s by default); a success forgets them; a record for an older
incarnation (a previous run of the process) no longer counts. An instance whose open
connection broke is *suspect*: it is only probed, one attempt at a time, for a moment, so
the calls dispatched while a just-crashed process is being found out do not all hit its port.

Pure logic, no I/O: the time is a parameter of every operation that needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from busreg.wire.models import Instance

__all__ = ["EjectionPolicy", "EjectionTable"]


@dataclass(frozen=True, slots=True)
class EjectionPolicy:
    """Back-off of local outlier ejection: ``base * multiplier**(failures - 1)``, capped.

    The default base (5 s) is longer than the default lease TTL (3 s) plus detection, so a
    crashed instance is normally removed by the registry before its ejection ends: one
    failed connect per caller, then never chosen again.

    ``suspicion``: how long an instance whose open connection broke (reset, closed without
    an answer: typical of a process that just died) is only *probed*, one attempt at a
    time, instead of receiving every call; a success clears it, a failed connect ejects it.

        EjectionPolicy(base=5.0, multiplier=2.0, maximum=60.0, suspicion=1.0)
    """

    base: float = 5.0
    multiplier: float = 2.0
    maximum: float = 60.0
    suspicion: float = 1.0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.maximum < self.base or self.multiplier < 1:
            raise ValueError("EjectionPolicy needs 0 < base <= maximum and multiplier >= 1")
        if self.suspicion < 0:
            raise ValueError("EjectionPolicy.suspicion must be >= 0")

    def backoff(self, failures: int) -> float:
        """Ejection time after ``failures`` consecutive connect failures (>= 1)."""
        exponent = max(0, failures - 1)
        if exponent > 64:  # far past the cap; avoid float overflow
            return self.maximum
        return float(min(self.maximum, self.base * self.multiplier**exponent))


@dataclass(slots=True)
class _Ejection:
    incarnation: int
    failures: int
    until: float


class EjectionTable:
    """The ejections and suspicions of one caller, by instance id.

    ``live`` (where asked for) is the source's current ``instances`` mapping: records of
    instances that left it are forgotten once over, which bounds the memory.

        EjectionTable(EjectionPolicy())
    """

    __slots__ = ("_ejected", "_suspects", "policy")

    def __init__(self, policy: EjectionPolicy | None = None) -> None:
        self.policy = policy or EjectionPolicy()
        self._ejected: dict[str, _Ejection] = {}
        self._suspects: dict[str, tuple[int, float]] = {}  # id -> (incarnation, until)

    def __bool__(self) -> bool:
        """Whether any record is kept (ended or stale ones included): if not, nothing is
        avoided and a caller may skip checking instances one by one."""
        return bool(self._ejected or self._suspects)

    @property
    def records(self) -> Mapping[str, _Ejection]:
        """The ejection records kept, by instance id (read-only; ended ones included)."""
        return self._ejected

    def is_ejected(self, instance: Instance, now: float) -> bool:
        """Whether ``instance`` is ejected at ``now``.

        A record for an older incarnation is dropped: the registry announced a new run."""
        record = self._ejected.get(instance.instance_id)
        if record is None:
            return False
        if record.incarnation != instance.incarnation:
            del self._ejected[instance.instance_id]
            return False
        return now < record.until

    def is_suspect(self, instance: Instance, now: float) -> bool:
        """Whether ``instance`` is only probed (one attempt at a time) at ``now``."""
        record = self._suspects.get(instance.instance_id)
        if record is None:
            return False
        incarnation, until = record
        if incarnation != instance.incarnation or now >= until:
            del self._suspects[instance.instance_id]
            return False
        return True

    def eject(
        self,
        instance: Instance,
        now: float,
        live: Mapping[str, Instance],
        until: float | None = None,
    ) -> float:
        """Eject ``instance`` until ``until``, by default ``now`` + the back-off of its
        consecutive failures; ends its suspicion. Returns the end of the ejection."""
        self.prune(now, live)
        record = self._ejected.get(instance.instance_id)
        if record is None or record.incarnation != instance.incarnation:
            record = _Ejection(instance.incarnation, 0, now)
            self._ejected[instance.instance_id] = record
        record.failures += 1
        record.until = now + self.policy.backoff(record.failures) if until is None else until
        self._suspects.pop(instance.instance_id, None)
        return record.until

    def suspect(self, instance: Instance, now: float, until: float | None = None) -> None:
        """Probe ``instance`` only until ``until`` (default: ``now`` + ``policy.suspicion``),
        unless it is ejected."""
        if self.is_ejected(instance, now):
            return
        end = now + self.policy.suspicion if until is None else until
        self._suspects[instance.instance_id] = (instance.incarnation, end)

    def reinstate(self, instance: Instance) -> None:
        """Forget ``instance``'s ejection, suspicion and failure count."""
        self._ejected.pop(instance.instance_id, None)
        self._suspects.pop(instance.instance_id, None)

    def ejected(self, now: float, live: Mapping[str, Instance]) -> dict[str, float]:
        """Instance id -> end of its ejection, for instances ejected at ``now`` (records of
        another incarnation than the one in ``live`` excluded)."""
        return {
            iid: r.until
            for iid, r in self._ejected.items()
            if r.until > now and (iid not in live or live[iid].incarnation == r.incarnation)
        }

    def prune(self, now: float, live: Mapping[str, Instance]) -> None:
        """Forget ended suspicions, and ended ejections of instances no longer in ``live``."""
        for iid in [i for i, r in self._ejected.items() if i not in live and r.until <= now]:
            del self._ejected[iid]
        for iid in [i for i, (_, until) in self._suspects.items() if until <= now]:
            del self._suspects[iid]
