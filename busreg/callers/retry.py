"""Ribbon-style timeouts and retries, a retry budget, and idempotency of retried writes.

A ``RetryPolicy`` holds Ribbon's parameters and checks the seed's rule for the outer
(Hystrix) timeout at construction::

    policy = RetryPolicy(connect=1.0, read=1.0, max_auto_retries=0, max_auto_retries_next_server=1)
    policy.worst_case()      # (1 + 1) * (0 + 1) * (1 + 1) = 4.0 seconds
    RetryPolicy(connect=1.0, read=1.0, max_auto_retries_next_server=1, deadline=3.0)
    # -> ConfigurationError: the deadline (3.0 s) is shorter than the worst case (4.0 s) ...

What is retried, per attempt outcome:

* **connect failure** (refused, connect timeout): the request never reached a server, so
  it is retried on the next server for every method (the instance is ejected locally);
* **read failure** (read timeout, reset, server closed without answering) and a
  **retryable status** (502, 503, 504 by default): the server may have acted on the
  request, so it is retried only if the method is idempotent (GET, HEAD, OPTIONS, PUT,
  DELETE, TRACE) or ``ok_to_retry_on_all_operations`` is set. In the latter case every
  attempt of one logical call carries the same ``Idempotency-Key`` header, so the callee
  can recognise a duplicate write (the seed's "unique business key").

A ``RetryBudget`` shared by a client's calls caps retries to a fraction of requests over a
sliding window (20 % plus 10 per second by default), so a failing dependency sees at most
~1.2x its normal load from each layer instead of (retries + 1)x per layer, multiplied
across the layers of a call chain.

Pure logic, no I/O; the budget's clock is a parameter.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from busreg.errors import ConfigurationError

__all__ = [
    "DEFAULT_RETRYABLE_STATUSES",
    "IDEMPOTENCY_HEADER",
    "IDEMPOTENT_METHODS",
    "CallState",
    "Decision",
    "Failure",
    "RetryBudget",
    "RetryPolicy",
]

#: Methods whose repetition has the effect of one call (RFC 9110 §9.2.2).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
#: Statuses meaning "this server could not handle it now; another may".
DEFAULT_RETRYABLE_STATUSES = frozenset({502, 503, 504})
#: Header carrying the key that makes a retried write recognisable as a duplicate.
IDEMPOTENCY_HEADER = "Idempotency-Key"


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Per-call timeouts and retries, Ribbon's parameters under Python names.

    ``connect`` / ``read``: ConnectTimeout / ReadTimeout of one attempt (seconds; the read
    timeout bounds each wait for data, as a socket timeout does). ``max_auto_retries``:
    retries on the same server (MaxAutoRetries). ``max_auto_retries_next_server``: other
    servers tried after the first (MaxAutoRetriesNextServer). ``deadline``: the caller's
    outer timeout (Hystrix's), which must not be shorter than ``worst_case()``.

        RetryPolicy(connect=1.0, read=1.0, max_auto_retries=0, max_auto_retries_next_server=1)
    """

    connect: float = 1.0
    read: float = 1.0
    max_auto_retries: int = 0
    max_auto_retries_next_server: int = 1
    ok_to_retry_on_all_operations: bool = False
    retryable_statuses: frozenset[int] = DEFAULT_RETRYABLE_STATUSES
    deadline: float | None = None

    def __post_init__(self) -> None:
        for name in ("connect", "read"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ConfigurationError(f"RetryPolicy.{name} must be a positive number of seconds")
        for name in ("max_auto_retries", "max_auto_retries_next_server"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100:
                raise ConfigurationError(f"RetryPolicy.{name} must be an integer from 0 to 100")
        statuses = frozenset(self.retryable_statuses)
        if any(not 100 <= s <= 599 for s in statuses):
            raise ConfigurationError("RetryPolicy.retryable_statuses must be HTTP statuses")
        object.__setattr__(self, "retryable_statuses", statuses)
        if self.deadline is not None:
            if not self.deadline > 0:
                raise ConfigurationError("RetryPolicy.deadline must be positive")
            worst = self.worst_case()
            if self.deadline < worst:
                raise ConfigurationError(
                    f"RetryPolicy deadline {self.deadline:g}s is shorter than the worst case "
                    f"{worst:g}s = (connect {self.connect:g} + read {self.read:g}) "
                    f"* (max_auto_retries {self.max_auto_retries} + 1) "
                    f"* (max_auto_retries_next_server {self.max_auto_retries_next_server} + 1): "
                    "the outer timeout would cut off retries the policy promises. Raise the "
                    "deadline, or lower the timeouts or retries"
                )

    @property
    def connect_timeout(self) -> float:
        return self.connect

    @property
    def read_timeout(self) -> float:
        return self.read

    @property
    def max_attempts(self) -> int:
        """Attempts of one call at most: ``(max_auto_retries + 1) * (next_server + 1)``."""
        return (self.max_auto_retries + 1) * (self.max_auto_retries_next_server + 1)

    def worst_case(self) -> float:
        """Longest a call can take: ``(connect + read) * (MaxAutoRetries + 1) *
        (MaxAutoRetriesNextServer + 1)``, the seed's lower bound for the outer timeout."""
        return (self.connect + self.read) * self.max_attempts

    def is_idempotent(self, method: str) -> bool:
        return method.upper() in IDEMPOTENT_METHODS

    def may_retry(self, method: str) -> bool:
        """Whether a request that may have reached the server can be sent again."""
        return self.ok_to_retry_on_all_operations or self.is_idempotent(method)

    def needs_idempotency_key(self, method: str) -> bool:
        """Non-idempotent requests get an ``Idempotency-Key`` when they may be retried."""
        return self.ok_to_retry_on_all_operations and not self.is_idempotent(method)


class Failure(Enum):
    """How one attempt went wrong."""

    CONNECT = "connect"  # no connection: the server never saw the request
    READ = "read"  # sent, then timeout/reset/closed: the server may have acted on it
    STATUS = "status"  # the server answered with a retryable status


class Decision(Enum):
    SAME_SERVER = "same-server"
    NEXT_SERVER = "next-server"
    GIVE_UP = "give-up"


@dataclass(slots=True)
class CallState:
    """Retry bookkeeping of one logical call (all its attempts).

    state = CallState(policy, "POST", headers)
    headers[IDEMPOTENCY_HEADER] = state.idempotency_key   # if not None: every attempt
    decision = state.decide(Failure.READ)                 # then state.advance(decision)
    """

    policy: RetryPolicy
    method: str
    headers: Mapping[str, str] = field(default_factory=dict)
    #: False for a streamed request body that cannot be sent twice.
    replayable: bool = True
    attempts: int = 1
    same_server_retries: int = 0
    servers: int = 1
    idempotency_key: str | None = None

    def __post_init__(self) -> None:
        self.method = self.method.upper()
        existing = _header(self.headers, IDEMPOTENCY_HEADER)
        if existing is not None:
            self.idempotency_key = existing
        elif self.policy.needs_idempotency_key(self.method):
            self.idempotency_key = uuid.uuid4().hex

    def decide(self, failure: Failure) -> Decision:
        """What to do after ``failure`` of the current attempt (before the budget)."""
        p = self.policy
        next_server = self.servers <= p.max_auto_retries_next_server
        if failure is Failure.CONNECT:
            # nothing was sent: safe for every method; the failed server is ejected, so
            # prefer another one, else use what is left of the same-server retries
            if next_server:
                return Decision.NEXT_SERVER
            if self.same_server_retries < p.max_auto_retries:
                return Decision.SAME_SERVER
            return Decision.GIVE_UP
        if not self.replayable or not p.may_retry(self.method):
            return Decision.GIVE_UP
        if self.same_server_retries < p.max_auto_retries:
            return Decision.SAME_SERVER
        if next_server:
            return Decision.NEXT_SERVER
        return Decision.GIVE_UP

    def advance(self, decision: Decision) -> None:
        """Count the retry ``decision`` asked for."""
        if decision is Decision.SAME_SERVER:
            self.same_server_retries += 1
        elif decision is Decision.NEXT_SERVER:
            self.servers += 1
            self.same_server_retries = 0
        else:
            return
        self.attempts += 1

    def retryable_status(self, status: int) -> bool:
        return status in self.policy.retryable_statuses


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lower = name.lower()
    for key, value in headers.items():
        if key.lower() == lower:
            return value
    return None


class RetryBudget:
    """Retries allowed: ``ratio`` of the requests plus ``min_per_second`` over ``window``.

    Finagle's retry budget: every request deposits ``ratio`` of a token, every retry must
    withdraw a whole one; a reserve of ``min_per_second * window`` tokens lets a quiet
    client retry at all. Deposits and withdrawals older than ``window`` no longer count.
    Share one budget among all calls of a client (the httpx transport does).

        budget = RetryBudget(ratio=0.2, min_per_second=10, window=10.0)
        budget.deposit()                 # once per logical call
        if budget.try_withdraw(): ...    # before each retry
    """

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        slots: int = 10,
    ) -> None:
        if not 0 <= ratio <= 10 or min_per_second < 0 or window <= 0 or slots < 1:
            raise ConfigurationError(
                "RetryBudget needs 0 <= ratio <= 10, min_per_second >= 0, window > 0"
            )
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self.clock = clock
        self._slot = window / slots
        self._slots = slots
        # (slot index, requests, retries), oldest first
        self._counts: deque[list[int]] = deque()
        #: Lifetime counters.
        self.requests = 0
        self.retries = 0
        self.denied = 0

    def _current(self) -> list[int]:
        index = math.floor(self.clock() / self._slot)
        counts = self._counts
        while counts and counts[0][0] <= index - self._slots:
            counts.popleft()
        if not counts or counts[-1][0] != index:
            counts.append([index, 0, 0])
        return counts[-1]

    def _totals(self) -> tuple[int, int]:
        self._current()
        return sum(c[1] for c in self._counts), sum(c[2] for c in self._counts)

    @property
    def balance(self) -> float:
        """Retries that would be allowed right now."""
        requests, retries = self._totals()
        return self.min_per_second * self.window + self.ratio * requests - retries

    def deposit(self, requests: int = 1) -> None:
        """Record ``requests`` new logical calls (first attempts)."""
        self._current()[1] += requests
        self.requests += requests

    def try_withdraw(self) -> bool:
        """Take a token for one retry; False (and counted as denied) if none is left."""
        if self.balance < 1:
            self.denied += 1
            return False
        self._current()[2] += 1
        self.retries += 1
        return True

    @staticmethod
    def unlimited() -> RetryBudget:
        """A budget that never refuses (tests, or callers with their own limit)."""
        return RetryBudget(ratio=0, min_per_second=1e18)
