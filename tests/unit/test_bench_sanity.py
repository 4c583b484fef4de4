"""``busreg bench`` fails (exit 1) only on a run that is unusable: a scenario that measured
nothing. CI relies on it for the new scenarios too (batched leases, agents, peer, idle)."""

from __future__ import annotations

from typing import Any

from busreg.bench.targets import sanity_problems


def _ok() -> dict[str, Any]:
    return {
        "batched": {"steps": [{"instances": 10_000, "window": {"applied_per_s": 9_990.0}}]},
        "agents": {"applied_per_s": 300.0},
        "peer": {"missing": 0, "heartbeats_per_s": 260.0},
        "idle": {"steps": [{"workers": 1}, {"workers": 2}]},
        "latency": {"first_register": {"visible_ms": {"count": 3}}, "hops_ms": {"batches": 9}},
    }


def test_a_usable_run_has_no_problems() -> None:
    assert sanity_problems(_ok()) == []


def test_scenarios_that_measured_nothing_are_problems() -> None:
    res = _ok()
    res["batched"]["steps"][0]["window"]["applied_per_s"] = 0.0
    res["agents"]["applied_per_s"] = 0.0
    res["peer"]["missing"] = 2
    res["idle"]["steps"] = [{"workers": 1}]
    res["latency"]["hops_ms"]["batches"] = 0
    problems = sanity_problems(res)
    assert problems == [
        "no per-hop figures from the worker",
        "nothing applied, batched 10000",
        "nothing applied behind agents",
        "peer probes not all seen by the subscriber",
        "idle steps missing",
    ]
