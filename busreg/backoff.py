"""The one back-off policy and retry loop of busreg's own call paths.

Each path retries in exactly one place (redis-py, aio-pika and rstream retries are kept off
where busreg retries), every retry is bounded (by a deadline, or by the caller's own stop
condition), and a streak of failures is logged once: the first failure as a warning, the
rest at debug level, and the recovery with how long it took::

    await retrying(lambda: store.apply(...), what="partition=3 apply", log=log,
                   backoff=Backoff(first=0.05, cap=1.0), retry_on=(BusregError,),
                   fatal=(Fenced,))

Only idempotent actions may be passed here: the call may have run even though it raised
(its reply was lost), and it will run again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["Backoff", "RetryLog", "retrying"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Pauses between attempts: ``first``, then ``factor`` times longer, never past ``cap``.

        >>> [Backoff(first=0.05, cap=0.3).delay(n) for n in range(4)]
        [0.05, 0.1, 0.2, 0.3]
    """

    first: float = 0.05
    cap: float = 1.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not (0 <= self.first <= self.cap) or self.factor < 1:
            raise ValueError("Backoff needs 0 <= first <= cap and factor >= 1")

    def delay(self, attempt: int) -> float:
        """Pause after failed attempt number ``attempt`` (0 = the first failure)."""
        if attempt <= 0:
            return self.first
        # capped before it can overflow: factor ** attempt grows without bound
        grown = self.first * self.factor ** min(attempt, 64)
        return min(self.cap, grown)


class RetryLog:
    """Logs a streak of failures of one call path once, and its end."""

    def __init__(self, log: logging.Logger, what: str, level: int = logging.WARNING) -> None:
        self._log = log
        self._what = what
        self._level = level
        self.failures = 0
        self._since = 0.0

    def failed(self, exc: BaseException) -> None:
        if self.failures == 0:
            self._since = asyncio.get_running_loop().time()
            self._log.log(self._level, "%s failed (%s); retrying", self._what, exc)
        else:
            self._log.debug("%s failed again (attempt %d): %s", self._what, self.failures + 1, exc)
        self.failures += 1

    def recovered(self) -> None:
        if self.failures:
            took = asyncio.get_running_loop().time() - self._since
            level = logging.INFO if self._level >= logging.WARNING else self._level
            self._log.log(
                level, "%s recovered after %d failures in %.2fs", self._what, self.failures, took
            )
            self.failures = 0


async def retrying(
    action: Callable[[], Awaitable[T]],
    *,
    what: str,
    log: logging.Logger,
    backoff: Backoff,
    retry_on: tuple[type[BaseException], ...],
    fatal: tuple[type[BaseException], ...] = (),
    deadline: float | None = None,
    stop: Callable[[], BaseException | None] | None = None,
    level: int = logging.WARNING,
) -> T:
    """Await ``action()`` until it returns, pausing per ``backoff`` after each failure of a
    ``retry_on`` type (``fatal`` types, and everything else, propagate at once).

    ``deadline``: seconds from now after which the last failure is raised instead of
    waiting again. ``stop``: checked before each attempt; the error it returns is raised
    (a runner that failed or lost its lease ends its retries)."""
    loop = asyncio.get_running_loop()
    end = None if deadline is None else loop.time() + deadline
    streak = RetryLog(log, what, level)
    attempt = 0
    while True:
        if stop is not None and (error := stop()) is not None:
            raise error
        try:
            result = await action()
        except fatal:
            raise
        except retry_on as exc:
            pause = backoff.delay(attempt)
            attempt += 1
            if end is not None and loop.time() + pause >= end:
                raise
            streak.failed(exc)
            await asyncio.sleep(pause)  # back-off between attempts, not synchronisation
            continue
        streak.recovered()
        return result
