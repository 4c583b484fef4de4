"""Turning the results into plain-text tables (they go into docs/benchmarks.md as is).

``--json`` prints the ``results`` dict instead, whose ratio figures all have ``ratio`` in
their names. Ratios, footprint, growth and the target check are added by ``targets.derive``.

Re-render a saved run: ``python -m busreg.bench.report RESULTS.json``.
"""

from __future__ import annotations

from typing import Any

from busreg.bench.cost_tables import cost_tables
from busreg.bench.fmt import fmt_num, fmt_ratio, table
from busreg.server.stats import HOPS

__all__ = ["render", "table"]


def _lat_row(name: str, stats: dict[str, Any], floor: dict[str, Any] | None) -> list[str]:
    f = floor or {}
    return [
        name,
        fmt_num(stats.get("count")),
        fmt_num(stats.get("p50"), 2),
        fmt_num(stats.get("p90"), 2),
        fmt_num(stats.get("p99"), 2),
        fmt_num(stats.get("max"), 2),
        fmt_ratio(stats["p50"] / f["p50"]) if f.get("p50") and stats.get("p50") else "-",
        fmt_ratio(stats["p99"] / f["p99"]) if f.get("p99") and stats.get("p99") else "-",
    ]


def render(res: dict[str, Any]) -> str:
    parts: list[str] = []
    m = res.get("machine", {})
    parts.append(
        f"busreg bench ({'quick' if res['config']['quick'] else 'full'}) on {m.get('cpus')} CPU "
        f"{m.get('cpu_model')}, RabbitMQ {m.get('rabbitmq')}, Redis {m.get('redis')}, "
        f"Python {m.get('python')}; {res.get('elapsed_s', 0):.0f} s\n"
    )
    b = res.get("baselines")
    if b:
        fl = b["floor"]["latency_ms"]
        rows = [
            [
                "stream publish, confirmed, batches of 500",
                f"{fmt_num(b['stream_publish_per_s'])} msg/s",
                f"{b['message_bytes']} B messages",
            ],
            [
                "stream consume (rstream, credit 20)",
                f"{fmt_num(b['stream_consume_per_s'])} msg/s",
                "",
            ],
            [
                "Redis pipelined lease updates (HSET+ZADD)",
                f"{fmt_num(b['redis_pipelined_updates_per_s'])} /s",
                "batches of 1,000",
            ],
            [
                "Redis Lua lease updates (HSET+ZADD)",
                f"{fmt_num(b['redis_lua_updates_per_s'])} /s",
                f"{fmt_ratio(b['lua_to_pipeline_ratio'])} pipelined",
            ],
            [
                "busreg apply.lua, heartbeats",
                f"{fmt_num(b['apply_lua_heartbeats_per_s'])} /s",
                f"{b['apply_lua_us_per_heartbeat']:.1f} us of Redis each",
            ],
            *(
                [
                    [
                        "apply.lua, 10 heartbeats, + WAIT 1",
                        f"p50 {b['apply_latency_ms']['p50']:.2f} -> "
                        f"{b['apply_wait1_latency_ms']['p50']:.2f} / p99 "
                        f"{b['apply_latency_ms']['p99']:.2f} -> "
                        f"{b['apply_wait1_latency_ms']['p99']:.2f} ms",
                        "a replica acknowledging each batch",
                    ]
                ]
                if "apply_wait1_latency_ms" in b
                else []
            ),
            [
                "AMQP publish, confirmed (aio-pika)",
                f"{fmt_num(b['amqp_publish_confirmed_per_s'])} msg/s",
                "the outbox drain's primitive",
            ],
            [
                "worker's Python decode + encode",
                f"{b['python_decode_encode_us_per_event']:.1f} us/event",
                f"{fmt_num(b['python_decode_events_per_s'])} /s on one core",
            ],
            [
                "3-hop floor latency",
                f"p50 {fl.get('p50', 0):.2f} / p99 {fl.get('p99', 0):.2f} "
                f"/ max {fl.get('max', 0):.2f} ms",
                f"{b['floor']['rate_per_s']} events/s, {fl.get('count')} samples, "
                f"{b['floor']['lost']} lost",
            ],
        ]
        parts.append(table("1. Baselines (same run)", ["raw path", "rate", "note"], rows))
    ing = res.get("ingestion")
    if ing:
        rows = []
        for s in ing["steps"]:
            for key in ("one_worker", "two_workers"):
                w = s.get(key)
                if not w:
                    continue
                lag = w["apply_lag_ms"]
                rows.append(
                    [
                        fmt_num(s["instances"]),
                        str(w["workers"]),
                        fmt_num(w["offered_per_s"]),
                        fmt_num(w["sent_per_s"]),
                        fmt_num(w["applied_per_s"]),
                        f"{w.get('applied_to_raw_consume_ratio') or 0:.3f}",
                        f"{fmt_num(lag.get('p50'))}/{fmt_num(lag.get('p99'))}",
                        fmt_num(w.get("worker_us_per_heartbeat"), 1),
                        fmt_num(w.get("redis_us_per_heartbeat"), 1),
                        fmt_num(w.get("broker_us_per_heartbeat"), 1),
                        fmt_num(w.get("server_us_per_heartbeat"), 1),
                        fmt_num(w.get("server_net_us_per_heartbeat"), 1),
                        fmt_num(w.get("loadgen_us_per_heartbeat"), 1),
                        fmt_num(w.get("keeps_up")),
                    ]
                )
        parts.append(
            table(
                "2. Heartbeat ingestion (one heartbeat per instance per second)",
                [
                    "instances",
                    "workers",
                    "offered/s",
                    "sent/s",
                    "applied/s",
                    "ratio to raw consume",
                    "lag p50/p99 ms",
                    "worker us/hb",
                    "redis us/hb",
                    "broker us/hb",
                    "server us/hb",
                    "net of idle",
                    "loadgen us/hb",
                    "keeps up",
                ],
                rows,
            )
        )
        idle = ing.get("idle_cpu_cores", {})
        parts.append(
            "   idle background during this run (cores): "
            + ", ".join(f"{k} {v:.3f}" for k, v in idle.items())
            + "\n"
        )
    d = res.get("drain")
    if d:
        rows = []
        for key in ("one_worker", "two_workers"):
            r = d.get(key)
            if r and "drain_per_s" in r:
                rows.append(
                    [
                        str(r["workers"]),
                        fmt_num(r["events"]),
                        fmt_num(r["applied"]),
                        f"{r['startup_s']:.2f}",
                        f"{r['drain_s']:.2f}",
                        fmt_num(r["drain_per_s"]),
                        f"{r['drain_to_raw_consume_ratio'] or 0:.3f}",
                        fmt_num(r["drain_incl_startup_per_s"]),
                    ]
                )
            elif r:
                rows.append(
                    [
                        str(r["workers"]),
                        fmt_num(r["events"]),
                        "-",
                        "-",
                        "-",
                        r.get("error", "?"),
                        "-",
                        "-",
                    ]
                )
        parts.append(
            table(
                f"2b. Backlog drain ({d['instances']:,} registered instances; "
                "worker started after the publish)",
                [
                    "workers",
                    "events",
                    "applied",
                    "startup s",
                    "drain s",
                    "events/s",
                    "ratio to raw consume",
                    "incl. startup /s",
                ],
                rows,
            )
        )
    lat = res.get("latency", {})
    floor = (b or {}).get("floor", {}).get("latency_ms")
    if "register" in lat:
        rows = []
        for name in ("register", "deregister"):
            for who in ("view", "wire", "confirm"):
                rows.append(
                    _lat_row(
                        f"{name} -> {who}", lat[name][who], floor if who != "confirm" else None
                    )
                )
        fresh = lat.get("first_register")
        if fresh:
            rows.append(_lat_row("fresh Registry: open", fresh["open_ms"], None))
            rows.append(_lat_row("fresh Registry: open -> register()", fresh["register_ms"], None))
            rows.append(_lat_row("fresh Registry: open -> wire", fresh["visible_ms"], None))
        if floor:
            rows.append(_lat_row("3-hop floor", floor, floor))
        parts.append(
            table(
                "3. Register / deregister -> watcher "
                f"(ms; {lat['register']['view'].get('count')} probes at "
                f"{lat.get('background_per_s', 0):,.0f} background heartbeats/s)",
                ["path", "n", "p50", "p90", "p99", "max", "p50 / floor", "p99 / floor"],
                rows,
            )
        )
    hops = lat.get("hops_ms")
    if hops and hops.get("batches"):
        parts.append(
            "   inside the worker, mean ms per batch with deltas "
            f"({fmt_num(hops['batches'])} batches): "
            + ", ".join(f"{hop} {fmt_num(hops.get(hop), 3)}" for hop, _ in HOPS)
            + " (deliver: broker timestamp, ms resolution, to the worker; confirm is not on "
            "a watcher's way)\n"
        )
    crash = lat.get("crash")
    if crash:
        rows = []
        for who in ("view", "wire"):
            st = crash[who]["after_ttl_ms"]
            rows.append(
                [
                    who,
                    fmt_num(st.get("count")),
                    fmt_num(st.get("min")),
                    fmt_num(st.get("p50")),
                    fmt_num(st.get("p99")),
                    fmt_num(st.get("max")),
                    str(crash[who]["missing"]),
                ]
            )
        parts.append(
            table(
                f"4. Crash detection: removal at watcher minus last heartbeat confirm, minus TTL "
                f"({crash['ttl_s']} s), ms; false expiries: {crash['false_expiries']}",
                ["watcher", "n", "min", "p50", "p99", "max", "missing"],
                rows,
            )
        )
    tk = res.get("takeover")
    if tk:
        rows = []
        for sig in ("SIGKILL", "SIGTERM"):
            st = tk.get(sig, {})
            rows.append(
                [
                    sig,
                    fmt_num(st.get("count")),
                    fmt_num(st.get("min"), 3),
                    fmt_num(st.get("p50"), 3),
                    fmt_num(st.get("max"), 3),
                    fmt_num(st.get("freed_median_s"), 3),
                    str(st.get("failed", 0)),
                ]
            )
        eo = tk.get("exactly_once", {})
        parts.append(
            table(
                "5. Worker takeover: signal -> standby owns every partition (s)",
                ["signal", "runs", "min", "median", "max", "old leases gone (median)", "failed"],
                rows,
            )
            + (
                f"   exactly once: {eo.get('applied', 0):,} applied of "
                f"{eo.get('heartbeats_confirmed', 0):,} "
                f"confirmed heartbeats, stale {eo.get('stale')}, redelivered-and-skipped "
                f"{eo.get('replayed_skipped')}: {'ok' if eo.get('ok') else 'MISMATCH'}\n"
            )
        )
    parts += cost_tables(res)
    fp = res.get("footprint")
    if fp:
        rows = [
            [
                fmt_num(r["instances"]),
                fmt_num(r["redis_bytes_per_instance"]),
                fmt_num(r["redis_used_memory_delta_per_instance"]),
                fmt_num((r["worker_rss_kib"] or 0) / 1024, 1),
                fmt_num((r["worker_peak_rss_kib"] or 0) / 1024, 1),
                fmt_num(r["broker_disk_bytes_per_heartbeat"], 1),
                fmt_num(r["heartbeat_bytes"]),
            ]
            for r in fp
        ]
        parts.append(
            table(
                "6. Footprint",
                [
                    "instances",
                    "Redis B/instance (MEMORY USAGE)",
                    "Redis used_memory delta B/instance",
                    "worker RSS MiB",
                    "worker peak MiB",
                    "broker disk B/heartbeat",
                    "heartbeat B",
                ],
                rows,
            )
        )
    gr = res.get("growth")
    if gr:
        rows = [
            [
                fmt_num(r["instances"]),
                f"{r['time_to_register_s']:.1f}",
                fmt_num(r["applied_per_s_1w"]),
                fmt_num(r["applied_per_s_2w"]),
                fmt_num(r["apply_lag_p99_ms_1w"]),
                fmt_num(r["server_us_per_heartbeat_1w"], 1),
                fmt_num(r["redis_bytes_per_instance"]),
                f"{r['worker_rss_mib']:.1f}",
            ]
            for r in gr
        ]
        parts.append(
            table(
                "7. Growth",
                [
                    "instances",
                    "registration s",
                    "applied/s 1w",
                    "applied/s 2w",
                    "lag p99 ms 1w",
                    "server us/hb 1w",
                    "Redis B/inst",
                    "worker RSS MiB",
                ],
                rows,
            )
        )
    rp = res.get("replication")
    if rp:
        parts.append(_replication(rp))
    crashes = res.get("subprocess_crashes")
    if crashes:
        lines = ["Subprocesses that exited on their own (a crash invalidates their figures):"]
        for cr in crashes:
            lines.append(f"  {cr['name']} exit {cr['exit_code']}")
            lines += [f"    | {ln}" for ln in cr["log_tail"].rstrip().splitlines()[-4:]]
        parts.append("\n".join(lines) + "\n")
    tg = res.get("targets")
    if tg:
        rows = [
            [
                t["target"],
                t["goal"],
                t["measured"],
                {True: "met", False: "MISSED", None: "-"}[t["met"]],
            ]
            for t in tg
        ]
        parts.append(
            table("Targets (benchmarks.md, issue 6)", ["figure", "target", "measured", ""], rows)
        )
    return "\n".join(parts)


def _replication(rp: dict[str, Any]) -> str:
    one, many, r = rp["single"], rp["replicated"], rp["ratios"]

    def row(name: str, a: Any, b: Any, ratio: float | None, digits: int = 0) -> list[str]:
        return [name, fmt_num(a, digits), fmt_num(b, digits), fmt_ratio(ratio) if ratio else "-"]

    rows = [
        row(
            "raw stream publish /s",
            one["stream_publish_per_s"],
            many["stream_publish_per_s"],
            r["raw_stream_publish"],
        ),
        row(
            "raw stream consume /s",
            one["stream_consume_per_s"],
            many["stream_consume_per_s"],
            r["raw_stream_consume"],
        ),
        row(
            "3-hop floor p50 ms",
            one["floor_ms"].get("p50"),
            many["floor_ms"].get("p50"),
            r["floor_p50"],
            2,
        ),
        row(
            f"busreg heartbeats applied /s ({one['ingestion']['instances']:,} instances)",
            one["ingestion"]["applied_per_s"],
            many["ingestion"]["applied_per_s"],
            r["ingestion_applied"],
        ),
        *(
            row(
                f"{what} CPU µs / heartbeat",
                one["ingestion"][f"{part}_us_per_heartbeat"],
                many["ingestion"][f"{part}_us_per_heartbeat"],
                r[f"{part}_us_per_heartbeat"],
                1,
            )
            for part, what in (
                ("broker", "broker (all nodes)"),
                ("worker", "worker"),
                ("redis", "Redis"),
            )
        ),
        row(
            "apply lag p99 ms",
            one["ingestion"]["apply_lag_ms"].get("p99"),
            many["ingestion"]["apply_lag_ms"].get("p99"),
            None,
            1,
        ),
        row(
            "register -> watcher p50 ms",
            one["register_view_ms"].get("p50"),
            many["register_view_ms"].get("p50"),
            r["register_view_p50"],
            2,
        ),
        row(
            "register -> watcher p99 ms",
            one["register_view_ms"].get("p99"),
            many["register_view_ms"].get("p99"),
            r["register_view_p99"],
            2,
        ),
    ]
    title = (
        f"8. Replication: {one['nodes']} node(s), {one['stream_replicas']} stream copy beside"
        f" {many['nodes']} nodes, {many['stream_replicas']} copies per stream"
    )
    return table(title, ["figure", "single", "replicated", "replicated / single"], rows)


if __name__ == "__main__":
    import json
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m busreg.bench.report RESULTS.json  (re-render a saved run)")
    with open(sys.argv[1]) as f:
        saved = json.load(f)
    from busreg.bench.targets import derive

    derive(saved)
    print(render(saved))
