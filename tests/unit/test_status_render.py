"""``busreg status`` says when a partition holds expiry back (outage grace), and how long."""

from __future__ import annotations

from typing import Any

from busreg.ops.status import _grace_left, render_status


def _row(k: int, grace_left_ms: int) -> dict[str, Any]:
    return {
        "partition": k, "owner": "w1", "token": "e/1.x", "committed_offset": 5,
        "head_offset": 5, "lag": 0, "instances": 3, "services": 1, "outbox": 0,
        "watermark_age_ms": 100, "grace_left_ms": grace_left_ms,
    }


def test_grace_left_is_until_minus_clock_and_never_negative() -> None:
    assert _grace_left({"clock": "1000", "grace_until": "7500"}) == 6500
    assert _grace_left({"clock": "9000", "grace_until": "7500"}) == 0
    assert _grace_left({"clock": "9000"}) == 0
    assert _grace_left({}) == 0


def test_partitions_in_grace_are_named() -> None:
    report = {"namespace": "prod", "workers": ["w1"], "partitions": [_row(0, 0), _row(1, 6500)]}
    assert render_status(report).splitlines()[-1] == "expiry held (outage grace): P1 6.5s"
    report["partitions"] = [_row(0, 0)]
    assert "expiry held" not in render_status(report)
