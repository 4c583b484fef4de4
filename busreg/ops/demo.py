"""``busreg demo``: the README's "see it run", on the configured RabbitMQ and Redis.

In a fresh namespace (deleted afterwards) it starts two shard workers (``busreg worker``
subprocesses) and the seed's story: three ``inventory`` instances and two ``cart``
instances, and cart calling inventory through a live view and round robin. A table shows
what the registry holds (the instance tables the workers keep in Redis) and what the caller
sees (its view, kept current by deltas). Then it crashes one inventory instance (SIGKILL of
its ``busreg register`` subprocess) and the worker owning inventory's partition, and prints:

* **detection time**: the last heartbeat the broker stored for the killed instance → the
  caller's view removing it (reason ``expired``); about the TTL plus a little;
* **takeover time**: the worker's SIGKILL → the other worker holding every partition.

It ends by itself after ``--duration`` seconds and removes everything it started:
processes, the namespace's streams, queues and exchanges, and its Redis keys.

This module is the story and its measurements; the screen is ``demo_board``'s and the
subprocesses are ``demo_procs``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from busreg import constants as c
from busreg.callers.balancer import RoundRobin
from busreg.client.registry import Registry
from busreg.errors import BusregError, ConfigurationError, InvalidEvent
from busreg.ops.admin import delete_namespace
from busreg.ops.demo_board import (
    CALLEE,
    CALLER,
    VICTIM,
    Board,
    board_summary,
    draw,
    follow_view,
    make_calls,
    poll_registry,
    render_board,
)
from busreg.ops.demo_procs import Child, Children, child_env
from busreg.server.store import PartitionStore
from busreg.settings import Settings
from busreg.tasks import close_quietly
from busreg.transport.connections import (
    connect_amqp,
    connect_redis,
    stream_consumer,
    translate_stream,
)
from busreg.transport.topology import apply_topology
from busreg.wire.codec import decode_ingest
from busreg.wire.models import Heartbeat, Register
from busreg.wire.routing import partition_for

__all__ = ["run_demo"]

#: Seconds the demo needs beyond TTL and lease TTLs: start-up, a calm moment, margins.
BASE_DURATION = 6.0
#: Bound on the story beyond ``--duration`` (only a hung broker or Redis call needs it).
STORY_GRACE = 20.0
#: Bound on deleting the namespace at the end.
CLEANUP_TIMEOUT = 30.0


def min_duration(settings: Settings) -> float:
    """Shortest ``--duration`` that leaves room for both crashes to be measured."""
    return BASE_DURATION + settings.client.ttl + 2 * settings.worker.lease_ttl


# --- measurements --------------------------------------------------------------------------------


async def _last_heartbeat(settings: Settings, instance_id: str, since: float) -> float | None:
    """Broker timestamp (s) of the newest register/heartbeat of ``instance_id`` in the stream,
    read from ``since`` (wall s) until a message written after ``since`` + 10 s or the head."""
    from rstream import ConsumerOffsetSpecification, OffsetType

    stream = c.ingest_partition(settings.namespace, partition_for(CALLEE, settings.partitions))
    newest: list[int] = []
    caught_up = asyncio.Event()
    horizon_ms = int(time.time() * 1000) - 200  # anything this recent is after the crash

    async def on_message(body: bytes, ctx: Any) -> None:
        try:
            event = decode_ingest(body).event
        except InvalidEvent:
            return
        if isinstance(event, Register | Heartbeat) and event.instance_id == instance_id:
            newest.append(ctx.timestamp)
        if ctx.timestamp >= horizon_ms:
            caught_up.set()

    consumer = await stream_consumer(settings, "busreg-demo-probe")
    try:
        with translate_stream(f"read {stream}"):
            sid = await consumer.subscribe(
                stream,
                on_message,
                offset_specification=ConsumerOffsetSpecification(
                    OffsetType.TIMESTAMP, int(since * 1000)
                ),
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    await caught_up.wait()
            await consumer.unsubscribe(sid)
    finally:
        await close_quietly(consumer.close, "demo probe consumer")
    return max(newest) / 1000 if newest else None


async def _owners(store: PartitionStore, partitions: int) -> list[str | None]:
    out: list[str | None] = []
    for k in range(partitions):
        holder = await store.owner(k)
        out.append(holder.split("|", 1)[0] if holder else None)
    return out


async def _until(
    stop: asyncio.Event, at: float, done: Callable[[], Awaitable[bool]] | None = None
) -> bool:
    """Wait until monotonic ``at`` (or, with ``done``, until it returns true; polled every
    10 ms: another process's state offers no notification). True if ``stop`` was set."""
    while time.monotonic() < at and not stop.is_set():
        if done is not None and await done():
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(0.01 if done else 0.5, at - time.monotonic())):
                await stop.wait()
    return stop.is_set()


# --- the story -----------------------------------------------------------------------------------


async def run_demo(
    settings: Settings,
    *,
    duration: float = 30.0,
    out: TextIO | None = None,
    gateway_port: int | None = None,
) -> int:
    """Run the demo on ``settings``' brokers in a fresh namespace; 0 if both figures were
    measured. Ends after ``duration`` seconds (plus clean-up). With ``gateway_port``, a
    ``busreg gateway`` (dashboard and HTTP API, with the operator pages) runs beside it on
    127.0.0.1 at that port, and its URL is printed first."""
    out = out or sys.stdout
    need = min_duration(settings)
    if duration < need:
        raise ConfigurationError(
            f"--duration must be at least {need:g}s with TTL {settings.client.ttl:g}s "
            f"and lease TTL {settings.worker.lease_ttl:g}s"
        )
    if settings.partitions < 2:
        raise ConfigurationError("the demo needs at least 2 partitions (two workers share them)")
    settings = settings.model_copy(update={"namespace": f"demo-{uuid.uuid4().hex[:8]}"})
    board = Board(settings, duration)
    tty = out.isatty()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            signals.append(sig)
    logdir = Path(tempfile.mkdtemp(prefix="busreg-demo-"))
    children = Children(child_env(settings), logdir)
    ok = False
    print(
        f"busreg demo: namespace {settings.namespace} on {_where(settings)}; ends in {duration:g}s",
        file=out,
        flush=True,
    )
    if tty:
        out.write("\x1b[?25l")  # hide the cursor while the table redraws
    try:
        conn = await connect_amqp(settings, "busreg-demo-setup")
        try:
            await apply_topology(conn, settings)
        finally:
            await conn.close()
        if gateway_port is not None:
            # a child like the workers: SIGTERMed with them at the end
            await children.spawn(
                "demo-gateway", "gateway", "--operator", "--port", str(gateway_port)
            )
            print(f"dashboard and HTTP API: http://127.0.0.1:{gateway_port}/", file=out, flush=True)
        redis = await connect_redis(settings)
        try:
            store = PartitionStore(redis, settings.namespace)
            try:
                # the story keeps its own schedule; this only bounds a hung broker call
                story = asyncio.current_task()
                watchdog = asyncio.get_running_loop().call_later(
                    duration + STORY_GRACE - 1, _report_stuck, story, out
                )
                try:
                    async with asyncio.timeout(duration + STORY_GRACE):
                        ok = await _story(board, store, children, stop, out, tty)
                finally:
                    watchdog.cancel()
            except TimeoutError:
                print(f"the demo overran {duration:g}s by {STORY_GRACE:g}s; stopping", file=out)
        finally:
            await redis.aclose()
    finally:
        if tty:
            out.write("\x1b[?25h")
        for sig in signals:
            loop.remove_signal_handler(sig)
        if stop.is_set():
            print("interrupted; cleaning up", file=out, flush=True)
        await children.close()
        crashed = children.crashed()
        for ch in crashed:
            print(f"{ch.name} exited with {ch.proc.returncode}:\n{ch.tail()}", file=out)
        try:
            async with asyncio.timeout(CLEANUP_TIMEOUT):
                await asyncio.shield(delete_namespace(settings))
            print(f"namespace {settings.namespace} deleted", file=out, flush=True)
        except (BusregError, TimeoutError) as exc:
            print(f"clean-up of namespace {settings.namespace} failed: {exc!r}", file=out)
        if (ok or stop.is_set()) and not crashed:
            shutil.rmtree(logdir, ignore_errors=True)
        else:
            print(f"process logs kept in {logdir}", file=out, flush=True)
    return 0 if ok else 1


def _report_stuck(story: asyncio.Task[Any] | None, out: TextIO) -> None:
    """Just before the story is cut short: where it and the tasks it waits for are stuck
    (the await chain of each pending task), so an overrun says what it was waiting on."""
    lines = ["the demo is about to overrun; pending tasks and where each waits:"]
    for task in asyncio.all_tasks():
        if task.done():
            continue
        chain: list[str] = []
        coro: Any = task.get_coro()
        while coro is not None and len(chain) < 12:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                where = f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"
                chain.append(f"{frame.f_code.co_name} ({where})")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        mark = " (the story)" if task is story else ""
        lines.append(f"  {task.get_name()}{mark}: " + " -> ".join(chain))
    print("\n".join(lines), file=out, flush=True)


def _where(settings: Settings) -> str:
    amqp = settings.amqp_urls()[0].rsplit("@", 1)[-1].rstrip("/")
    redis = settings.redis_url.rsplit("@", 1)[-1].split("://")[-1]
    return f"RabbitMQ {amqp}, Redis {redis}"


async def _story(
    board: Board,
    store: PartitionStore,
    children: Children,
    stop: asyncio.Event,
    out: TextIO,
    tty: bool,
) -> bool:
    s = board.settings
    deadline = board.started + board.duration
    plain = None if tty else out
    workers = [
        await children.spawn(f"demo-w{n}", "worker", "--worker-id", f"demo-w{n}") for n in (1, 2)
    ]
    ids = [w.name for w in workers]
    board.event(
        f"started workers {', '.join(ids)} (pids {workers[0].proc.pid}, {workers[1].proc.pid})",
        plain,
    )

    async def shared() -> bool:
        owners = await _owners(store, s.partitions)
        return all(o is not None for o in owners) and set(owners) == set(ids)

    start_by = board.started + board.duration / 3
    if await _until(stop, start_by, shared) or not await shared():
        board.lines.append(_failed("the two workers did not share the partitions", workers))
        print(board.lines[-1], file=out)
        return False
    board.event("both workers own partitions", plain)

    async with Registry(s, name="busreg-demo") as registry:
        for n, zone in ((1, "zone-a"), (2, "zone-b")):
            await registry.register(
                CALLEE, address=f"127.0.0.1:810{n}", instance_id=f"inventory-{n}", zone=zone
            )
            await registry.register(
                CALLER, address=f"127.0.0.1:820{n}", instance_id=f"cart-{n}", zone=zone
            )
        victim = await children.spawn(
            VICTIM,
            "register",
            CALLEE,
            "--address",
            "127.0.0.1:8103",
            "--instance-id",
            VICTIM,
            "--zone",
            "zone-a",
        )
        view = await registry.watch(CALLEE)
        balancer = RoundRobin(view)
        board.view, board.balancer = view, balancer
        removed = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(follow_view(board, view, removed, plain)),
                tg.create_task(poll_registry(board, store)),
                tg.create_task(make_calls(board, balancer, plain)),
                tg.create_task(draw(board, out, tty)),
            ]
            try:
                return await _crashes(
                    board, store, children, victim, workers, removed, stop, deadline, plain
                )
            finally:
                if tty:  # the final picture, figures included
                    out.write("\x1b[H\x1b[2J" + render_board(board) + "\n")
                for task in tasks:
                    task.cancel()


async def _crashes(
    board: Board,
    store: PartitionStore,
    children: Children,
    victim: Child,
    workers: list[Child],
    removed: asyncio.Event,
    stop: asyncio.Event,
    deadline: float,
    plain: TextIO | None,
) -> bool:
    s = board.settings
    assert board.view is not None
    view = board.view

    async def three() -> bool:
        return len(view.instances) == 3

    if await _until(stop, deadline, three):
        return False
    board.event(f"{CALLER}'s view has {CALLEE} x3; calls go round robin", plain)

    # 1. an inventory instance crashes: its heartbeats stop, nobody deregisters it
    calm = max(time.monotonic() + 2.0, board.started + board.duration * 0.3)
    if await _until(stop, calm):
        return False
    killed_at = time.time()
    await children.kill(victim)
    board.dead.add(VICTIM)
    board.event(f"SIGKILL {VICTIM} (pid {victim.proc.pid}): its heartbeats stop", plain)

    async def seen() -> bool:
        return removed.is_set()

    if await _until(stop, deadline, seen) or board.removed_at is None:
        board.lines.append(f"detection time: not measured ({VICTIM} not removed in time)")
    else:
        since = killed_at - 2 * s.client.heartbeat_interval - 1
        try:
            async with asyncio.timeout(5):
                last = await _last_heartbeat(s, VICTIM, since)
        except (BusregError, TimeoutError):
            last = None
        if last is None:
            board.detection = board.removed_at - killed_at
            board.lines.append(
                f"detection time: {board.detection:.3f} s (SIGKILL -> {CALLER}'s view "
                f"removed {VICTIM}; its last heartbeat was not found in the stream)"
            )
        else:
            board.detection = board.removed_at - last
            board.lines.append(
                f"detection time: {board.detection:.3f} s (last heartbeat of {VICTIM} -> "
                f"{CALLER}'s view removed it: TTL {s.client.ttl:g} s + "
                f"{(board.detection - s.client.ttl) * 1000:.0f} ms)"
            )
        board.event(board.lines[-1], plain)

    # 2. the worker owning inventory's partition crashes: the other one takes over
    if await _until(stop, min(deadline, time.monotonic() + 1.0)):
        return False
    home = partition_for(CALLEE, s.partitions)
    holder = (await _owners(store, s.partitions))[home]
    doomed = next((w for w in workers if w.name == holder), workers[0])
    survivor = next(w for w in workers if w is not doomed)
    t0 = time.monotonic()
    await children.kill(doomed)
    board.event(
        f"SIGKILL {doomed.name} (pid {doomed.proc.pid}), owner of {CALLEE}'s partition {home}",
        plain,
    )

    async def taken() -> bool:
        return all(o == survivor.name for o in await _owners(store, s.partitions))

    if await _until(stop, deadline, taken) or not await taken():
        board.lines.append(
            f"takeover time: not measured ({survivor.name} did not own every partition in time)"
        )
    else:
        board.takeover = time.monotonic() - t0
        board.lines.append(
            f"takeover time: {board.takeover:.3f} s (SIGKILL of {doomed.name} -> "
            f"{survivor.name} holds all {s.partitions} partitions; lease TTL "
            f"{s.worker.lease_ttl:g} s)"
        )
        board.event(board.lines[-1], plain)

    # 3. the caller keeps working on what is left until the end
    await _until(stop, deadline)
    if plain is not None:
        print(board_summary(board), file=plain)
        for line in board.lines:
            print(line, file=plain, flush=True)
    return board.detection is not None and board.takeover is not None


def _failed(what: str, children: list[Child]) -> str:
    tails = "\n".join(f"--- {ch.name}:\n{ch.tail()}" for ch in children)
    return f"demo failed: {what}\n{tails}"
