"""A partition whose subscription delivers nothing while its own ticks are confirmed is
taken for dead (found on the 3-node cluster: after a graceful node restart one partition
stood still for a minute, with no close event from rstream)."""

from __future__ import annotations

import time
from typing import Any, cast

from busreg import Settings
from busreg import constants as c
from busreg.errors import ConnectionFailed
from busreg.server.runner import PartitionRunner
from busreg.server.store import Lease


def _runner() -> PartitionRunner:
    lease = Lease(partition=0, token="e/1.n", epoch="e", offset=5, holder="w|e/1.n")
    return PartitionRunner(
        lease, Settings(), cast(Any, None), cast(Any, None), cast(Any, None), "w"
    )


def test_a_silent_subscription_fails_the_runner() -> None:
    runner = _runner()
    runner._last_delivery = time.monotonic() - c.SUBSCRIPTION_SILENCE - 1
    runner._check_subscription()
    assert isinstance(runner._failure, ConnectionFailed)


def test_recent_deliveries_or_a_backlog_are_not_silence() -> None:
    runner = _runner()
    runner._last_delivery = time.monotonic()
    runner._check_subscription()
    assert runner._failure is None
    runner._last_delivery = time.monotonic() - c.SUBSCRIPTION_SILENCE - 1
    runner._buf.append((6, 0, b"{}"))  # waiting to be applied: the reader is just held back
    runner._check_subscription()
    assert runner._failure is None
