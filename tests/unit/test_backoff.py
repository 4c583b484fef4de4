"""busreg.backoff: the one retry loop — bounded, idempotent-only, a streak logged once."""

from __future__ import annotations

import asyncio
import logging

import pytest

from busreg.backoff import Backoff, retrying
from busreg.errors import BusregError, Fenced


def test_delays_grow_to_the_cap() -> None:
    b = Backoff(first=0.05, cap=0.3)
    assert [b.delay(n) for n in range(5)] == [0.05, 0.1, 0.2, 0.3, 0.3]
    assert Backoff(first=0.0, cap=0.0).delay(7) == 0.0
    assert Backoff(first=0.2, cap=2.0).delay(10_000) == 2.0  # no overflow


@pytest.mark.parametrize(("first", "cap", "factor"), [(-1, 1, 2), (2, 1, 2), (0.1, 1, 0.5)])
def test_nonsense_policies_are_refused(first: float, cap: float, factor: float) -> None:
    with pytest.raises(ValueError, match="Backoff"):
        Backoff(first=first, cap=cap, factor=factor)


async def test_retries_until_success_and_logs_the_streak_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 5:
            raise BusregError(f"down {calls}")
        return "ok"

    log = logging.getLogger("busreg.test")
    with caplog.at_level(logging.DEBUG, logger="busreg.test"):
        result = await retrying(
            flaky, what="thing", log=log, backoff=Backoff(0.0, 0.0), retry_on=(BusregError,)
        )
    assert (result, calls) == ("ok", 5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["thing failed (down 1); retrying"]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1
    assert infos[0].startswith("thing recovered after 4 failures")


async def test_fatal_and_unlisted_errors_propagate_at_once() -> None:
    calls = 0

    async def fenced() -> None:
        nonlocal calls
        calls += 1
        raise Fenced("lost the lease")

    log = logging.getLogger("busreg.test")
    with pytest.raises(Fenced):
        await retrying(
            fenced, what="x", log=log, backoff=Backoff(), retry_on=(BusregError,), fatal=(Fenced,)
        )
    with pytest.raises(KeyError):
        await retrying(
            lambda: asyncio.sleep(0, result={}["k"]),  # type: ignore[func-returns-value]
            what="x",
            log=log,
            backoff=Backoff(),
            retry_on=(BusregError,),
        )
    assert calls == 1


async def test_deadline_raises_the_last_failure() -> None:
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise BusregError(f"attempt {calls}")

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(BusregError, match="attempt"):
        await retrying(
            down,
            what="x",
            log=logging.getLogger("busreg.test"),
            backoff=Backoff(first=0.01, cap=0.02),
            retry_on=(BusregError,),
            deadline=0.1,
        )
    assert loop.time() - started < 0.5
    assert 2 <= calls <= 10


async def test_stop_condition_ends_the_retries() -> None:
    stop_with: list[BaseException] = []

    async def down() -> None:
        stop_with.append(Fenced("runner failed"))
        raise BusregError("down")

    with pytest.raises(Fenced, match="runner failed"):
        await retrying(
            down,
            what="x",
            log=logging.getLogger("busreg.test"),
            backoff=Backoff(0.0, 0.0),
            retry_on=(BusregError,),
            stop=lambda: stop_with[0] if stop_with else None,
        )
