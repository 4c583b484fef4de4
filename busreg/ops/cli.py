"""``busreg`` command line. The only place that configures logging.

    busreg topology apply
    busreg worker
    busreg register inventory --address 10.0.0.7:8080 --zone eu-1a --meta version=2
    busreg ls [SERVICE] [--json]
    busreg watch SERVICE [--json]
    busreg set-status SERVICE INSTANCE OUT_OF_SERVICE --reason "drain" | --clear
    busreg status [--json]
    busreg demo [--duration 30] [--gateway 8500]

Settings come from ``BUSREG_*`` environment variables; flags override them. Errors print
one line on stderr and exit with status 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from busreg.client.checks import parse_check
from busreg.client.registration import checked_registration
from busreg.client.registry import Registry
from busreg.errors import BusregError, ConfigurationError
from busreg.ops.logs import configure_logging
from busreg.settings import Settings, load_settings
from busreg.tasks import until_signal
from busreg.transport.connections import connect_amqp
from busreg.transport.topology import apply_topology, verify_partitions

__all__ = ["main"]

log = logging.getLogger("busreg.cli")


def _parser() -> argparse.ArgumentParser:
    # SUPPRESS: an option given before the subcommand must not be reset by the
    # subcommand's copy of it (argparse applies sub-parser defaults last)
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--amqp-url", help="AMQP URL (env BUSREG_AMQP_URL)")
    common.add_argument("--stream-url", help="stream URL (env BUSREG_STREAM_URL)")
    common.add_argument(
        "--redis-url",
        help="Redis URL: worker, status, topology delete, demo, bench, gateway --operator "
        "(env BUSREG_REDIS_URL)",
    )
    common.add_argument("--namespace", help="namespace prefix (env BUSREG_NAMESPACE)")
    common.add_argument(
        "--partitions", type=int, help="ingest partitions P (env BUSREG_PARTITIONS)"
    )
    common.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO"
    )
    common.add_argument("--log-format", choices=["text", "json"], help="default text")

    parser = argparse.ArgumentParser(
        prog="busreg",
        description="Service registry on RabbitMQ streams and Redis.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"busreg {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    w = sub.add_parser("worker", parents=[common], help="run a shard worker (foreground)")
    w.add_argument("--worker-id", help="stable id of this worker (default host-pid-random)")
    w.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (env BUSREG_WORKER__METRICS_PORT)",
    )
    w.add_argument("--metrics-host", help="address of the metrics port (default 0.0.0.0)")

    r = sub.add_parser("register", parents=[common], help="register one instance and heartbeat")
    r.add_argument("service")
    r.add_argument("--address", required=True, help="HOST:PORT callers should use")
    r.add_argument("--instance-id")
    r.add_argument("--zone", default="default")
    r.add_argument("--status", default="UP", choices=["UP", "DOWN", "STARTING", "OUT_OF_SERVICE"])
    r.add_argument("--meta", action="append", default=[], metavar="K=V", help="metadata entry")
    r.add_argument("--ttl", type=float, help="lease TTL seconds (default 3)")
    r.add_argument("--interval", type=float, help="heartbeat interval seconds (default 1)")
    r.add_argument("--check", metavar="URL", help="health check: http(s)://... or tcp://H:P")
    r.add_argument("--check-cmd", metavar="COMMAND", help="health check: exit 0 is healthy")
    r.add_argument("--check-interval", type=float, default=5.0, help="seconds (default 5)")
    r.add_argument("--check-timeout", type=float, default=2.0, help="seconds (default 2)")
    r.add_argument("--check-failures", type=int, default=2, help="failed checks before DOWN")
    r.add_argument("--check-successes", type=int, default=1, help="passing checks before UP")
    r.add_argument(
        "--agent",
        metavar="SOCKET",
        help="register through the local agent at this Unix socket (busreg agent) instead "
        "of connecting to the brokers; the instance lives as long as this command",
    )

    ag = sub.add_parser(
        "agent",
        parents=[common],
        help="serve local instances over a Unix socket; renew their leases in batches",
    )
    ag.add_argument(
        "--socket",
        default="/run/busreg/agent.sock",
        help="Unix socket path (default /run/busreg/agent.sock)",
    )

    ls = sub.add_parser("ls", parents=[common], help="list services, or one service's instances")
    ls.add_argument("service", nargs="?")
    ls.add_argument("--json", action="store_true")

    wa = sub.add_parser("watch", parents=[common], help="print a service's instances and changes")
    wa.add_argument("service")
    wa.add_argument("--json", action="store_true")
    wa.add_argument("--duration", type=float, help="stop after this many seconds")

    st = sub.add_parser("status", parents=[common], help="workers, partition owners, lag")
    st.add_argument("--json", action="store_true")

    b = sub.add_parser(
        "bench",
        parents=[common],
        help="measure busreg beside the raw broker and Redis",
        add_help=False,
    )
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="see `busreg bench --help`")

    d = sub.add_parser("deadletters", parents=[common], help="show refused events and deltas")
    d.add_argument("--limit", type=int, default=20, help="how many of the oldest to show")
    d.add_argument("--ack", action="store_true", help="remove the ones shown from the queue")
    d.add_argument("--json", action="store_true")

    k = sub.add_parser("keys", parents=[common], help="print service signing keys")
    k.add_argument("services", nargs="*", metavar="SERVICE")
    k.add_argument(
        "--admin", action="store_true", help="also the operators' key (set-status, any service)"
    )

    ss = sub.add_parser(
        "set-status",
        parents=[common],
        help="override an instance's status as an operator (drain before a deploy)",
    )
    ss.add_argument("service")
    ss.add_argument("instance_id", metavar="INSTANCE")
    ss.add_argument("status", nargs="?", choices=["OUT_OF_SERVICE", "DOWN", "UP"])
    ss.add_argument("--clear", action="store_true", help="end the override")
    ss.add_argument("--reason", default="", help="why (shown with the override)")
    ss.add_argument("--by", help="who (default user@host)")
    ss.add_argument("--wait", type=float, default=5.0, help="seconds to see it applied")

    de = sub.add_parser(
        "demo",
        parents=[common],
        help="see it run: two workers, cart -> inventory, a crash and a takeover",
    )
    de.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="seconds until it ends by itself (default 30; at least 12 with default timings)",
    )
    de.add_argument(
        "--gateway",
        type=int,
        metavar="PORT",
        help="also run `busreg gateway` (dashboard, HTTP API) on 127.0.0.1:PORT",
    )

    gw = sub.add_parser(
        "gateway", parents=[common], help="serve the dashboard, HTTP API and discovery endpoints"
    )
    gw.add_argument("--host", help="address to bind (default 127.0.0.1; BUSREG_GATEWAY__HOST)")
    gw.add_argument("--port", type=int, help="port (default 8500; BUSREG_GATEWAY__PORT)")
    gw.add_argument("--route", action="store_true", help="also route /route/<service>/...")
    gw.add_argument(
        "--operator",
        action="store_true",
        help="operator pages from Redis, like `busreg status` (also on with --redis-url)",
    )

    t = sub.add_parser("topology", parents=[common], help="declare or remove the broker topology")
    t.add_argument("action", choices=["apply", "check", "delete"])
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        amqp_url=getattr(args, "amqp_url", None),
        stream_url=getattr(args, "stream_url", None),
        redis_url=getattr(args, "redis_url", None),
        namespace=getattr(args, "namespace", None),
        partitions=getattr(args, "partitions", None),
    )


async def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError

    from busreg.server.worker import Worker
    from busreg.settings import WorkerSettings
    from busreg.wire.models import first_error

    flags = {
        name: getattr(args, name)
        for name in ("metrics_port", "metrics_host")
        if getattr(args, name, None) is not None
    }
    if flags:
        try:
            worker_settings = WorkerSettings.model_validate(settings.worker.model_dump() | flags)
        except ValidationError as exc:
            where, message = first_error(exc)
            flag = where.split(".")[0].replace("_", "-")
            raise ConfigurationError(f"--{flag}: {message}") from None
        settings = settings.model_copy(update={"worker": worker_settings})
    async with Worker(settings, worker_id=args.worker_id) as worker:
        await until_signal(worker.run, worker.stop)
    return 0


def _parse_meta(items: Sequence[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigurationError(f"--meta expects KEY=VALUE, got {item!r}")
        meta[key] = value
    return meta


async def _cmd_register(args: argparse.Namespace, settings: Settings) -> int:
    fields: dict[str, Any] = {
        "address": args.address,
        "instance_id": args.instance_id,
        "zone": args.zone,
        "status": args.status,
        "metadata": _parse_meta(args.meta),
        "ttl": args.ttl,
        "interval": args.interval,
    }
    # refused before anything connects (the same checks as Registry.register)
    checked_registration(settings, args.service, **fields)
    if args.agent:
        if args.check or args.check_cmd:
            raise ConfigurationError("--check and --check-cmd are not supported with --agent")
        from busreg.agent.commands import register_through_agent

        return await register_through_agent(args.agent, args.service, fields)
    check = parse_check(
        args.check,
        args.check_cmd,
        interval=args.check_interval,
        timeout=args.check_timeout,
        failures=args.check_failures,
        successes=args.check_successes,
    )
    stop = asyncio.Event()
    async with Registry(settings, name=f"busreg-register {args.service}") as registry:
        reg = await registry.register(args.service, **fields, check=check)
        print(
            f"registered {reg.service}/{reg.instance_id} at {reg.address} "
            f"(ttl {reg.ttl}s, heartbeat every {reg.interval}s); Ctrl-C to deregister",
            flush=True,
        )

        async def wait() -> None:
            await stop.wait()

        await until_signal(wait, stop.set)
    print(f"deregistered {reg.service}/{reg.instance_id}", flush=True)
    return 0


def _table(rows: list[list[str]], header: list[str]) -> str:
    from busreg.ops.listing import table

    return table(rows, header)


async def _cmd_agent(args: argparse.Namespace, settings: Settings) -> int:
    from busreg.agent.commands import run_agent

    return await run_agent(settings, args.socket)


async def _cmd_ls(args: argparse.Namespace, settings: Settings) -> int:
    from busreg.ops.listing import list_services

    return await list_services(settings, args.service, as_json=args.json)


async def _cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    from busreg.ops.listing import watch_service

    stop = asyncio.Event()
    return await watch_service(
        settings,
        args.service,
        as_json=args.json,
        duration=args.duration,
        until=lambda run: until_signal(run, stop.set),
        stop=stop,
    )


async def _cmd_topology(args: argparse.Namespace, settings: Settings) -> int:
    conn = await connect_amqp(settings, "busreg-topology")
    try:
        if args.action == "apply":
            await apply_topology(conn, settings)
            print(
                f"topology of namespace {settings.namespace!r} applied "
                f"({settings.partitions} partitions)"
            )
        elif args.action == "check":
            await verify_partitions(conn, settings)
            print(
                f"topology of namespace {settings.namespace!r} is in place "
                f"({settings.partitions} partitions)"
            )
        else:
            from busreg.ops.admin import delete_namespace

            keys = await delete_namespace(settings)
            print(f"namespace {settings.namespace!r} deleted (topology and {keys} Redis keys)")
    finally:
        await conn.close()
    return 0


async def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from busreg.ops.demo import run_demo

    return await run_demo(settings, duration=args.duration, gateway_port=args.gateway)


async def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from busreg.ops.status import collect_status, render_status

    report = await collect_status(settings)
    print(json.dumps(report) if args.json else render_status(report))
    return 0


async def _cmd_deadletters(args: argparse.Namespace, settings: Settings) -> int:
    from busreg.ops.deadletters import read_dead_letters

    if args.limit < 0:
        raise ConfigurationError("--limit must be >= 0")
    total, letters = await read_dead_letters(settings, limit=args.limit, ack=args.ack)
    if args.json:
        for letter in letters:
            print(json.dumps(letter))
        return 0
    print(f"{total} dead letter(s) in {settings.namespace}.deadletter; oldest {len(letters)}:")
    rows = [
        [
            str(x.get("reason")),
            str(x.get("partition", x.get("queue", ""))),
            str(x.get("offset", "")),
            str(x.get("detail", ""))[:60],
            str(x.get("body"))[:60],
        ]
        for x in letters
    ]
    if rows:
        print(_table(rows, ["REASON", "PARTITION/QUEUE", "OFFSET", "DETAIL", "BODY"]))
    return 0


async def _cmd_set_status(args: argparse.Namespace, settings: Settings) -> int:
    from busreg.ops.overrides import set_status
    from busreg.wire.models import InstanceStatus

    if (args.status is None) == (not args.clear):
        raise ConfigurationError("give a STATUS (OUT_OF_SERVICE, DOWN, UP) or --clear, not both")
    status = None if args.clear else InstanceStatus(args.status)
    line = await set_status(
        settings,
        args.service,
        args.instance_id,
        status,
        reason=args.reason,
        by=args.by,
        wait=args.wait,
    )
    print(line)
    return 0


async def _cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from busreg.wire.auth import ADMIN, admin_key, service_key
    from busreg.wire.models import Register

    secret = settings.auth.secret_bytes()
    if secret is None:
        raise ConfigurationError("set BUSREG_AUTH__SECRET (the workers' secret) to derive keys")
    if not args.services and not args.admin:
        raise ConfigurationError("name one or more services, or --admin")
    if args.admin:
        print(f"{ADMIN}={admin_key(secret).hex()}")
    for service in args.services:
        try:  # names are validated exactly like registrations
            Register(service=service, instance_id="x", incarnation=0, seq=0, address="h:1")
        except ValueError as exc:
            raise ConfigurationError(f"invalid service name {service!r}") from exc
        print(f"{service}={service_key(secret, service).hex()}")
    return 0


async def _cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError

    from busreg.gateway.server import serve
    from busreg.settings import GatewaySettings
    from busreg.wire.models import first_error

    flags: dict[str, Any] = {
        name: getattr(args, name) for name in ("host", "port") if getattr(args, name) is not None
    }
    if args.route:
        flags["route"] = True
    # operator pages read Redis: only when asked for, or when a Redis URL is given here
    if args.operator or getattr(args, "redis_url", None) is not None:
        flags["operator"] = True
    try:
        gateway = GatewaySettings.model_validate(settings.gateway.model_dump() | flags)
    except ValidationError as exc:
        where, message = first_error(exc)
        raise ConfigurationError(f"--{where.split('.')[0]}: {message}") from None
    await serve(settings.model_copy(update={"gateway": gateway}))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]] = {
    "worker": _cmd_worker,
    "register": _cmd_register,
    "agent": _cmd_agent,
    "ls": _cmd_ls,
    "watch": _cmd_watch,
    "topology": _cmd_topology,
    "status": _cmd_status,
    "deadletters": _cmd_deadletters,
    "keys": _cmd_keys,
    "set-status": _cmd_set_status,
    "demo": _cmd_demo,
    "gateway": _cmd_gateway,
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("busreg")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args, unknown = _parser().parse_known_args(argv)
    if args.command == "bench":
        from busreg.bench import main as bench_main

        configure_logging(getattr(args, "log_level", "WARNING"), "text")
        try:
            return bench_main([*unknown, *args.bench_args], _settings(args))
        except BusregError as exc:
            print(f"busreg: error: {exc}", file=sys.stderr)
            return 1
    if unknown:
        _parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    # the demo draws a table on the terminal: only problems may interrupt it
    default_level = "WARNING" if args.command == "demo" else "INFO"
    configure_logging(
        getattr(args, "log_level", default_level), getattr(args, "log_format", "text")
    )
    try:
        settings = _settings(args)
        return asyncio.run(COMMANDS[args.command](args, settings))
    except BusregError as exc:
        print(f"busreg: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
