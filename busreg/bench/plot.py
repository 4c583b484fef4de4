"""PNG plots of a bench run (``busreg bench --plot DIR``). Needs matplotlib, imported here
only: busreg itself does not depend on it (``pip install matplotlib``).

Re-plot a saved run: ``python -m busreg.bench.plot RESULTS.json SAMPLES.json DIR``."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

__all__ = ["write_plots"]


def write_plots(
    results: dict[str, Any], samples: dict[str, list[float]], directory: str
) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("busreg bench --plot needs matplotlib: pip install matplotlib") from exc
    os.makedirs(directory, exist_ok=True)
    written = []

    # latency distributions (CDFs): floor vs register/deregister, and crash detection
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label in (
        ("floor", "3-hop floor (raw stream→Redis→AMQP)"),
        ("register_wire", "register → delta on the wire"),
        ("register_view", "register → ServiceView change"),
        ("deregister_view", "deregister → ServiceView change"),
    ):
        data = sorted(x * 1000 for x in samples.get(key, []))
        if data:
            ax1.plot(data, [(i + 1) / len(data) for i in range(len(data))], label=label)
    ax1.set_xscale("log")
    ax1.set_xlabel("latency (ms, log scale)")
    ax1.set_ylabel("fraction of events")
    ax1.axvline(3.4, color="grey", linestyle=":", label="target p99 3.4 ms")
    ax1.set_title("register / deregister → watcher vs the 3-hop floor")
    ax1.legend(fontsize=8)
    ax1.grid(True, alpha=0.3)
    crash = results.get("latency", {}).get("crash", {})
    for key, label in (("crash_view", "ServiceView"), ("crash_wire", "delta on the wire")):
        data = sorted(x * 1000 for x in samples.get(key, []))
        if data:
            ax2.plot(data, [(i + 1) / len(data) for i in range(len(data))], label=label)
    ax2.axvline(150, color="grey", linestyle=":", label="target median TTL + 150 ms")
    ax2.axvline(300, color="grey", linestyle="--", label="target max TTL + 300 ms")
    ax2.set_xlabel(f"removal seen - last heartbeat confirm - TTL ({crash.get('ttl_s', '?')} s), ms")
    ax2.set_ylabel("fraction of crashed instances")
    ax2.set_title("crash detection")
    ax2.legend(fontsize=8)
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    path = os.path.join(directory, "bench-latency.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    growth = results.get("growth") or []
    if growth:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        xs = [g["instances"] for g in growth]
        ax1.plot(xs, xs, "k:", label="offered (1 heartbeat/s per instance)")
        ax1.plot(xs, [g["applied_per_s_1w"] for g in growth], "o-", label="applied, 1 worker")
        two = [(g["instances"], g["applied_per_s_2w"]) for g in growth if g["applied_per_s_2w"]]
        if two:
            ax1.plot([t[0] for t in two], [t[1] for t in two], "s-", label="applied, 2 workers")
        ax1.axhline(32_000, color="grey", linestyle="--", label="target 32,000/s")
        drain = results.get("drain") or {}
        for key, marker, label in (
            ("one_worker", "v", "backlog drain, 1 worker"),
            ("two_workers", "^", "backlog drain, 2 workers"),
        ):
            rate = (drain.get(key) or {}).get("drain_per_s")
            if rate:
                ax1.plot([drain["instances"]], [rate], marker, markersize=9, label=label)
        base = results.get("baselines", {})
        if base.get("stream_consume_per_s"):
            ax1.set_title(
                f"heartbeats/s vs instances (raw consume {base['stream_consume_per_s']:,.0f}/s)"
            )
        ax1.set_xscale("log")
        ax1.set_yscale("log")
        ax1.set_xlabel("simulated instances")
        ax1.set_ylabel("heartbeats/s")
        ax1.legend(fontsize=8)
        ax1.grid(True, alpha=0.3)
        ax2.plot(
            xs,
            [g["server_us_per_heartbeat_1w"] or 0 for g in growth],
            "o-",
            label="server CPU µs/heartbeat (worker+Redis+broker)",
        )
        ax2.plot(
            xs,
            [g["redis_bytes_per_instance"] or 0 for g in growth],
            "s-",
            label="Redis bytes/instance",
        )
        ax2.plot(xs, [g["worker_rss_mib"] for g in growth], "^-", label="worker RSS MiB")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("simulated instances")
        ax2.set_title("cost vs instances (1 worker)")
        ax2.legend(fontsize=8)
        ax2.grid(True, alpha=0.3)
        fig.tight_layout()
        path = os.path.join(directory, "bench-throughput.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m busreg.bench.plot RESULTS.json SAMPLES.json DIR")
    with open(sys.argv[1]) as f_results, open(sys.argv[2]) as f_samples:
        for written in write_plots(json.load(f_results), json.load(f_samples), sys.argv[3]):
            print(written)
