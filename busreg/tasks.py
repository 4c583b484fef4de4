"""Two asyncio helpers every long-lived busreg object needs: stopping tasks for sure and
closing connections without letting a dead peer hold up (or fail) a shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Collection
from typing import Any

__all__ = ["cancel_until_done", "close_quietly", "until_signal", "waiting_in"]

log = logging.getLogger("busreg.tasks")


async def cancel_until_done(tasks: Collection[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again any that is still running.

    Why again: on Python 3.11, ``asyncio.wait_for`` (which redis-py and aio-pika use inside
    every call) swallows a cancellation that arrives as its inner future completes
    (CPython gh-86296, fixed in 3.12), and the task runs on. Seen here as a task looping
    for ever after one ``cancel()``."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)


async def close_quietly(
    close: Callable[[], Awaitable[Any]], what: str, timeout: float = 5.0
) -> None:
    """Await ``close()`` for at most ``timeout`` seconds; a failure is logged at debug level.

    For connections, channels and consumers that may already be dead: closing them is best
    effort and must neither hang a shutdown nor mask the error that caused it. A
    cancellation of the caller still propagates (only ``Exception`` is absorbed)."""
    try:
        async with asyncio.timeout(timeout):
            await close()
    except Exception as exc:  # the peer may be gone already; nothing to keep
        log.debug("%s close: %r", what, exc)


async def until_signal(main: Callable[[], Awaitable[None]], on_signal: Callable[[], None]) -> None:
    """Run ``main()``; SIGTERM and SIGINT call ``on_signal`` (a graceful stop) meanwhile."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await main()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def waiting_in(suffix: str) -> str:
    """Where each running task whose name ends with ``suffix`` waits, as ``name func:line``
    (for a deadline that passed: what held it up)."""
    where = []
    for task in asyncio.all_tasks():
        name = task.get_name()
        if name.endswith(suffix):
            frames = task.get_stack(limit=1)
            line = f"{frames[-1].f_code.co_name}:{frames[-1].f_lineno}" if frames else "?"
            where.append(f"{name} {line}")
    return ", ".join(sorted(where)) or "none"
