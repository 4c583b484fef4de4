"""Report tables of what leases and an idle namespace cost: batched leases (2c) and the
idle namespace (5b). Split from report.py, which renders the other sections."""

from __future__ import annotations

from typing import Any

from busreg.bench.fmt import fmt_num, table

__all__ = ["cost_tables"]


def cost_tables(res: dict[str, Any]) -> list[str]:
    parts: list[str] = []
    bt = res.get("batched")
    if bt:
        rows = []
        for st in bt.get("steps", []):
            w = st["window"]
            lag = w["apply_lag_ms"]
            rows.append(
                [
                    fmt_num(st["instances"]),
                    fmt_num(w["offered_per_s"]),
                    fmt_num(w["applied_per_s"]),
                    fmt_num(w["messages_per_s"]),
                    f"{fmt_num(lag.get('p50'))}/{fmt_num(lag.get('p99'))}",
                    fmt_num(w.get("worker_us_per_heartbeat"), 1),
                    fmt_num(w.get("broker_us_per_heartbeat"), 1),
                    fmt_num(w.get("redis_us_per_heartbeat"), 1),
                    fmt_num(w.get("server_us_per_heartbeat"), 1),
                    "yes" if w.get("keeps_up") else "no",
                ]
            )
        parts.append(
            table(
                f"2c. Batched leases ({bt.get('per_message')} heartbeats per message, 1 worker; "
                "us per instance-heartbeat)",
                [
                    "instances",
                    "offered/s",
                    "applied/s",
                    "messages/s",
                    "lag p50/p99 ms",
                    "worker us",
                    "broker us",
                    "redis us",
                    "server us",
                    "keeps up",
                ],
                rows,
            )
        )
    idle = res.get("idle")
    if idle:
        bg = idle.get("background", {})
        rows = [
            [
                str(st["workers"]),
                *(f"{100 * st['net'][k]:.2f}" for k in ("worker", "broker", "redis", "total")),
            ]
            for st in idle.get("steps", [])
        ]
        parts.append(
            table(
                f"5b. Idle namespace ({idle.get('partitions')} partitions, no instances; "
                f"% of a core over {idle.get('seconds')} s, net of the servers' background)",
                ["workers", "worker %", "broker %", "redis %", "total %"],
                rows,
            )
            + "   servers' own background: "
            + ", ".join(f"{k} {100 * v:.2f} %" for k, v in bg.items())
            + "\n"
        )
    ag = res.get("agents")
    if ag:
        parts.append(
            f"   behind agents: {ag['instances']:,} instances behind {ag['agents']} agents, "
            f"{fmt_num(ag['applied_per_s'])} heartbeats/s applied: server "
            f"{fmt_num(ag.get('server_us_per_heartbeat'), 1)} us per instance-heartbeat "
            f"(worker {fmt_num(ag.get('worker_us_per_heartbeat'), 1)}, broker "
            f"{fmt_num(ag.get('broker_us_per_heartbeat'), 1)}, Redis "
            f"{fmt_num(ag.get('redis_us_per_heartbeat'), 1)}); the agents' own "
            f"{fmt_num(ag.get('agents_us_per_heartbeat'), 1)} us\n"
        )
    pe = res.get("peer")
    if pe:
        c = pe.get("confirmed_to_notified_ms", {})
        k = pe.get("call_to_notified_ms", {})
        parts.append(
            table(
                f"8. Peer workload ({pe['instances']:,} instances over {pe['services']} services, "
                f"1 s heartbeat, 3 s TTL, {pe['fleet']} fleet processes, registrations at "
                "100/s, one subscriber on every service)",
                ["figure", "busreg", "etcd 3.4 (issue 17)", "ZooKeeper 3.8 (issue 17)"],
                [
                    [
                        "write confirmed -> subscriber notified, p50 / p99 ms",
                        f"{fmt_num(c.get('p50'), 2)} / {fmt_num(c.get('p99'), 2)}",
                        "1.09 / 3.88",
                        "1.96 / 8.12",
                    ],
                    [
                        "call -> subscriber notified, p50 / p99 ms",
                        f"{fmt_num(k.get('p50'), 2)} / {fmt_num(k.get('p99'), 2)}",
                        "-",
                        "-",
                    ],
                    [
                        f"server CPU at {fmt_num(pe.get('heartbeats_per_s'))} heartbeats/s",
                        f"{fmt_num(pe.get('server_cpu_percent'), 1)} % of a core, "
                        f"{fmt_num(pe.get('server_us_per_heartbeat'), 1)} us/hb (worker "
                        f"{fmt_num(pe.get('worker_us_per_heartbeat'), 1)}, broker "
                        f"{fmt_num(pe.get('broker_us_per_heartbeat'), 1)}, Redis "
                        f"{fmt_num(pe.get('redis_us_per_heartbeat'), 1)})",
                        "18.1 %, 181 us/hb",
                        "18.3 %, 145 us per ping",
                    ],
                ],
            )
            + "   (etcd and ZooKeeper: their figures from the issue's run of 2026-12-01, same "
            "machine; not re-run here)\n"
        )
    return parts
