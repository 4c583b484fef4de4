"""Project tests use busreg's own pytest plugin (busreg.testing, loaded by entry point), so
the plugin is exercised on every run through the BUSREG_TEST_*_URL path.

A hung test is failed by pytest-timeout, whose thread dump of an asyncio test shows only the
event loop waiting in ``select``. So shortly before that, a watchdog thread prints the stack
of every pending asyncio task: the await a test is stuck on. pytest shows it with the
failure (captured stderr)."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
from collections.abc import Iterator

import pytest

#: print task stacks this long before pytest-timeout fails the test
_MARGIN = 15.0


def _dump_pending_tasks(test: str) -> None:
    tasks = [o for o in gc.get_objects() if isinstance(o, asyncio.Task) and not o.done()]
    print(f"\n=== {test}: {len(tasks)} pending asyncio task(s) ===", file=sys.stderr)
    for task in tasks:
        # Task.get_stack shows a suspended task's outer frame only: follow the awaits down
        lines = [f"--- {task.get_name()}"]
        try:
            coro = task.get_coro()
            while coro is not None and len(lines) < 40:
                frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
                if frame is not None:
                    code = frame.f_code
                    lines.append(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}")
                coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        except Exception as exc:  # a frame changed under us: the dump is best effort
            lines.append(f"  (unavailable: {exc!r})")
        print("\n".join(lines), file=sys.stderr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    option = item.config.getoption("timeout", default=None)  # --timeout, else the ini value
    limit = float(option if option is not None else item.config.getini("timeout") or 0)
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        limit = float(marker.args[0])
    timer = None
    if limit > _MARGIN * 2:
        timer = threading.Timer(limit - _MARGIN, _dump_pending_tasks, args=(item.nodeid,))
        timer.daemon = True
        timer.start()
    try:
        return (yield)
    finally:
        if timer is not None:
            timer.cancel()
