"""Derived figures of a bench run: ratios, footprint, growth, the target check against
docs/benchmarks.md / issue 6, and the sanity check CI relies on (figures present and non-zero)."""

from __future__ import annotations

from typing import Any

from busreg.bench.fmt import fmt_num, fmt_ratio

__all__ = ["derive", "sanity_problems"]


def _keeps_up(window: dict[str, Any]) -> bool:
    lag = window.get("apply_lag_ms", {}).get("p99")
    return (
        window.get("applied_per_s", 0) >= 0.97 * window.get("offered_per_s", 1)
        and lag is not None
        and lag < 1000
    )


def derive(results: dict[str, Any]) -> None:
    """Add ratios, footprint, growth and the target check to ``results`` (in place)."""
    base = results.get("baselines", {})
    consume = base.get("stream_consume_per_s")
    ing = results.get("ingestion")
    if ing:
        idle = ing.get("idle_cpu_cores", {})
        for step in ing["steps"]:
            for key in ("one_worker", "two_workers"):
                w = step.get(key)
                if not w:
                    continue
                # the machine is shared: take off what broker and Redis burnt while idle
                cpu, wall = w["cpu_seconds"], w["seconds"]
                applied = w["applied_per_s"] * wall
                net = cpu["worker"] + sum(
                    max(0.0, cpu[k] - idle.get(k, 0.0) * wall) for k in ("broker", "redis")
                )
                w["server_net_us_per_heartbeat"] = net / applied * 1e6 if applied else None
                w["applied_to_raw_consume_ratio"] = (
                    w["applied_per_s"] / consume if consume else None
                )
                w["applied_to_offered_ratio"] = w["applied_per_s"] / w["offered_per_s"]
                w["keeps_up"] = _keeps_up(w)
            if step.get("two_workers") and step["one_worker"]["applied_per_s"] > 0:
                step["two_to_one_worker_ratio"] = (
                    step["two_workers"]["applied_per_s"] / step["one_worker"]["applied_per_s"]
                )
        results["footprint"] = [
            {
                "instances": s["instances"],
                "redis_bytes_per_instance": s.get("redis_bytes_per_instance"),
                "redis_used_memory_delta_per_instance": s.get(
                    "redis_used_memory_delta_per_instance"
                ),
                "worker_rss_kib": s.get("worker_rss_kib", {}).get("VmRSS"),
                "worker_peak_rss_kib": s.get("worker_rss_kib", {}).get("VmHWM"),
                "broker_disk_bytes_per_heartbeat": s["one_worker"].get(
                    "broker_disk_bytes_per_heartbeat"
                ),
                "heartbeat_bytes": ing.get("heartbeat_bytes"),
            }
            for s in ing["steps"]
        ]
        results["growth"] = [
            {
                "instances": s["instances"],
                "time_to_register_s": s["time_to_register_s"],
                "applied_per_s_1w": s["one_worker"]["applied_per_s"],
                "applied_per_s_2w": (s.get("two_workers") or {}).get("applied_per_s"),
                "apply_lag_p99_ms_1w": s["one_worker"]["apply_lag_ms"].get("p99"),
                "server_us_per_heartbeat_1w": s["one_worker"].get("server_us_per_heartbeat"),
                "redis_bytes_per_instance": s.get("redis_bytes_per_instance"),
                "worker_rss_mib": (s.get("worker_rss_kib", {}).get("VmRSS") or 0) / 1024,
            }
            for s in ing["steps"]
        ]
    results["targets"] = _targets(results)


def _targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(name: str, target: str, measured: str, met: bool | None) -> None:
        rows.append({"target": name, "goal": target, "measured": measured, "met": met})

    ing = res.get("ingestion")
    if ing and ing["steps"]:
        steps = ing["steps"]

        def sustained(w: dict[str, Any]) -> bool:
            return bool(
                w["apply_lag_ms"].get("p99", 1e9) < 100
                and w["applied_per_s"] >= 0.97 * w["offered_per_s"]
            )

        windows = [
            (s["instances"], w)
            for s in steps
            for w in (s["one_worker"], s.get("two_workers"))
            if w and sustained(w)
        ]
        best1 = max((w for _, w in windows if w["workers"] == 1),
                    key=lambda w: w["applied_per_s"], default=None)  # fmt: skip
        best = max(windows, key=lambda nw: nw[1]["applied_per_s"], default=None)
        top = steps[-1]["one_worker"]
        add(
            "heartbeats/s sustained (all offered applied, p99 apply lag < 100 ms)",
            ">= 32,000/s",
            (
                f"{fmt_num(best[1]['applied_per_s'])}/s with {best[1]['workers']} worker(s); "
                if best
                else "none; "
            )
            + f"1 worker: {fmt_num(best1 and best1['applied_per_s'])}/s; saturated 1 worker "
            f"applies {fmt_num(top['applied_per_s'])}/s at {steps[-1]['instances']:,} offered",
            bool(best and best[1]["applied_per_s"] >= 0.97 * 32_000),
        )
        compared = [
            (s["instances"], s["one_worker"], s["two_workers"])
            for s in steps
            if s.get("two_workers") and not s["one_worker"].get("keeps_up")
        ]
        if compared:
            notes, verdicts = [], []
            for n, one, two_w in compared:
                better = two_w["applied_per_s"] > 1.05 * one["applied_per_s"] or bool(
                    two_w.get("keeps_up") and not one.get("keeps_up")
                )
                verdicts.append(better)
                notes.append(
                    f"{n:,}: {fmt_num(two_w['applied_per_s'])}/s lag p99 "
                    f"{fmt_num(two_w['apply_lag_ms'].get('p99'))} ms vs 1 worker "
                    f"{fmt_num(one['applied_per_s'])}/s lag p99 "
                    f"{fmt_num(one['apply_lag_ms'].get('p99'))} ms"
                )
            add(
                "2 workers vs 1 where 1 worker falls behind",
                "more applied or lag kept < 1 s",
                "; ".join(notes),
                any(verdicts),
            )
        k1 = next((s for s in steps if s["instances"] == 1000), None)
        if k1 is not None:
            us = k1["one_worker"].get("server_us_per_heartbeat")
            net = k1["one_worker"].get("server_net_us_per_heartbeat")
            add(
                "server CPU per heartbeat at 1,000/s (net of idle background)",
                "<= 150 us",
                f"{fmt_num(net, 1)} us ({fmt_num(us, 1)} us raw)",
                net is not None and net <= 150,
            )
        us = top.get("server_us_per_heartbeat")
        net = top.get("server_net_us_per_heartbeat")
        saturated = not top.get("keeps_up", True)
        add(
            "server CPU per heartbeat "
            + ("at saturation" if saturated else "at the largest step (not saturated)")
            + f" ({top['applied_per_s']:,.0f}/s applied)",
            "<= 60 us",
            f"{fmt_num(net, 1)} us ({fmt_num(us, 1)} us raw)",
            net is not None and net <= 60,
        )
        last = steps[-1]
        bpi = last.get("redis_bytes_per_instance")
        add(
            "Redis bytes per instance",
            "<= 400 B",
            f"{fmt_num(bpi)} B at {last['instances']:,}",
            bpi is not None and bpi <= 400,
        )
        # RSS against instance count, at the steps the worker kept up with (a saturated
        # worker's RSS is its full buffers, reported in the footprint table)
        rss = [
            s.get("worker_rss_kib", {}).get("VmRSS")
            for s in steps
            if s["one_worker"].get("keeps_up")
        ]
        if len(rss) >= 2 and all(rss):
            growth_mib = (rss[-1] - rss[0]) / 1024
            buffers_mib = (
                ing["partitions"] * 20_000 * (ing.get("heartbeat_bytes", 250) + 100) / 2**20
            )
            add(
                "worker RSS flat vs instances (steps it kept up with)",
                f"growth <= {buffers_mib:.0f} MiB (P x buffer_max x message)",
                f"{rss[0] / 1024:.0f} -> {rss[-1] / 1024:.0f} MiB",
                growth_mib <= buffers_mib,
            )
    drain = res.get("drain")
    if drain and "drain_per_s" in drain.get("one_worker", {}):
        one = drain["one_worker"]
        add(
            "backlog drain, 1 worker",
            ">= 50,000 events/s",
            f"{fmt_num(one['drain_per_s'])}/s",
            one["drain_per_s"] >= 50_000,
        )
        rat = one.get("drain_to_raw_consume_ratio")
        add(
            "backlog drain vs raw consume",
            ">= 0.10x (within 10x)",
            fmt_ratio(rat),
            rat is not None and rat >= 0.1,
        )
        two = drain.get("two_workers", {})
        if "drain_per_s" in two:
            add(
                "backlog drain, 2 workers",
                "better than 1",
                f"{fmt_num(two['drain_per_s'])}/s "
                f"({fmt_ratio(drain.get('two_to_one_worker_ratio'))})",
                two["drain_per_s"] > one["drain_per_s"],
            )
    lat = res.get("latency", {})
    for name in ("register", "deregister"):
        if name not in lat:
            continue
        view = lat[name]["view"]
        p50, p99 = view.get("p50"), view.get("p99")
        add(
            f"{name} -> watcher p50 / p99",
            "<= 1.5 / 4 ms",
            f"{fmt_num(p50, 2)} / {fmt_num(p99, 2)} ms",
            p50 is not None and p99 is not None and p50 <= 1.5 and p99 <= 4.0,
        )
        r50, r99 = lat[name].get("view_p50_floor_ratio"), lat[name].get("view_p99_floor_ratio")
        add(
            f"{name} -> watcher vs 3-hop floor, p50 / p99",
            "<= 1.3x",
            f"{fmt_ratio(r50)} / {fmt_ratio(r99)}",
            r50 is not None and r99 is not None and r50 <= 1.3 and r99 <= 1.3,
        )
    fresh = lat.get("first_register")
    if fresh:
        vis = fresh["visible_ms"].get("max")
        add(
            f"fresh Registry's first register -> watcher (max of {fresh['runs']})",
            "<= 50 ms",
            f"{fmt_num(vis, 1)} ms (median {fmt_num(fresh['visible_ms'].get('p50'), 1)})",
            vis is not None and vis <= 50,
        )
    crash = lat.get("crash")
    if crash:
        v = crash["view"]["after_ttl_ms"]
        add(
            "crash -> watcher, median after TTL",
            "<= 150 ms",
            f"TTL + {fmt_num(v.get('p50'))} ms",
            v.get("p50") is not None and v["p50"] <= 150,
        )
        add(
            "crash -> watcher, max after TTL",
            "<= 300 ms",
            f"TTL + {fmt_num(v.get('max'))} ms",
            v.get("max") is not None and v["max"] <= 300,
        )
        add("no false expiry", "0", str(crash["false_expiries"]), crash["false_expiries"] == 0)
    bt = res.get("batched")
    if bt and bt.get("steps"):
        best = bt.get("sustained_per_s")
        add(
            f"instance-heartbeats/s sustained, batched ({bt['per_message']} per message)",
            ">= 48,000/s",
            f"{fmt_num(best)}/s" if best else "none sustained",
            best is not None and best >= 0.97 * 48_000,
        )
    ag = res.get("agents")
    if ag:
        us = ag.get("server_us_per_heartbeat")
        add(
            f"server CPU per instance-heartbeat, {ag['instances']:,} behind {ag['agents']} agents",
            "<= 20 us",
            f"{fmt_num(us, 1)} us",
            us is not None and us <= 20,
        )
    pe = res.get("peer")
    if pe:
        c = pe.get("confirmed_to_notified_ms", {})
        add(
            "peer workload: write confirmed -> subscriber notified, p50 / p99",
            "<= 1.5 / 4 ms",
            f"{fmt_num(c.get('p50'), 2)} / {fmt_num(c.get('p99'), 2)} ms",
            c.get("p50") is not None and c["p50"] <= 1.5 and c["p99"] <= 4.0,
        )
        us = pe.get("server_us_per_heartbeat")
        add(
            "peer workload: server CPU per heartbeat at 1,000/s (fleet in 10 processes)",
            "<= 150 us",
            f"{fmt_num(us, 1)} us",
            us is not None and us <= 150,
        )
    idle = res.get("idle")
    if idle and idle.get("steps"):
        one = idle["steps"][0]["net"]["total"] * 100
        add(
            "idle namespace, 1 worker (broker + worker + Redis, net)",
            "<= 0.5 % of a core",
            f"{one:.2f} %",
            one <= 0.5,
        )
    tk = res.get("takeover")
    if tk:
        for sig, goal in (("SIGKILL", 2.0), ("SIGTERM", 0.3)):
            st = tk.get(sig, {})
            if st.get("count"):
                add(
                    f"takeover after {sig} (max of {st['count']})",
                    f"<= {goal} s",
                    f"{st['max']:.3f} s (median {st['p50']:.3f})",
                    st["max"] <= goal and not st.get("failed"),
                )
        eo = tk.get("exactly_once")
        if eo:
            add(
                "no event lost or applied twice across takeovers",
                "applied == confirmed, stale 0",
                f"{eo['applied']:,} / {eo['heartbeats_confirmed']:,}, stale {eo['stale']}",
                eo["ok"],
            )
    return rows


# --- rendering ---------------------------------------------------------------------------------


def sanity_problems(res: dict[str, Any]) -> list[str]:
    """What makes a run unusable (zero or missing figures); timing targets are not checked."""
    problems: list[str] = []

    def need(cond: bool, what: str) -> None:
        if not cond:
            problems.append(what)

    b = res.get("baselines")
    if b is not None:
        for key in (
            "stream_publish_per_s",
            "stream_consume_per_s",
            "redis_pipelined_updates_per_s",
            "redis_lua_updates_per_s",
            "apply_lua_heartbeats_per_s",
        ):
            need(b.get(key, 0) > 0, f"baseline {key} is zero")
        need(b["floor"]["latency_ms"].get("count", 0) > 0, "no 3-hop floor samples")
    ing = res.get("ingestion")
    if ing is not None:
        need(bool(ing["steps"]), "no ingestion steps")
        for s in ing["steps"]:
            need(s["one_worker"]["applied_per_s"] > 0, f"nothing applied at {s['instances']}")
            need(
                (s.get("redis_bytes_per_instance") or 0) > 0,
                f"no Redis footprint at {s['instances']}",
            )
    d = res.get("drain")
    if d is not None:
        for key in ("one_worker", "two_workers"):
            need(d.get(key, {}).get("drain_per_s", 0) > 0, f"backlog drain ({key}) failed")
    lat = res.get("latency", {})
    for name in ("register", "deregister"):
        if name in lat:
            need(lat[name]["view"].get("count", 0) > 0, f"no {name} -> view samples")
    if "crash" in lat:
        need(lat["crash"]["view"]["after_ttl_ms"].get("count", 0) > 0, "no crash detections")
    fresh = lat.get("first_register")
    if fresh is not None:
        need(fresh["visible_ms"].get("count", 0) > 0, "no fresh registration seen")
    hops = lat.get("hops_ms")
    if hops is not None:
        need((hops.get("batches") or 0) > 0, "no per-hop figures from the worker")
    bt = res.get("batched")
    if bt is not None:
        need(bool(bt["steps"]), "no batched steps")
        for s in bt["steps"]:
            need(s["window"]["applied_per_s"] > 0, f"nothing applied, batched {s['instances']}")
    ag = res.get("agents")
    if ag is not None:
        need(ag.get("applied_per_s", 0) > 0, "nothing applied behind agents")
    pe = res.get("peer")
    if pe is not None:
        need(pe.get("missing", 1) == 0, "peer probes not all seen by the subscriber")
        need((pe.get("heartbeats_per_s") or 0) > 0, "no peer heartbeats applied")
    idle = res.get("idle")
    if idle is not None:
        need(len(idle.get("steps", [])) == 2, "idle steps missing")
    tk = res.get("takeover")
    if tk is not None:
        for sig in ("SIGKILL", "SIGTERM"):
            need(tk.get(sig, {}).get("count", 0) > 0, f"no successful takeover after {sig}")
    return problems
