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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from busreg import constants as c
from busreg.callers.balancer import RoundRobin
from busreg.client.registry import Registry
from busreg.client.view import ServiceView
from busreg.errors import BusregError, ConfigurationError, InvalidEvent, NoInstanceAvailable
from busreg.ops.admin import delete_namespace
from busreg.server.store import PartitionStore
from busreg.settings import Settings
from busreg.transport.connections import (
    connect_amqp,
    connect_redis,
    stream_consumer,
    translate_stream,
)
from busreg.transport.topology import apply_topology
from busreg.wire.codec import decode_ingest
from busreg.wire.models import DeltaKind, Heartbeat, Instance, Register
from busreg.wire.routing import partition_for

__all__ = ["run_demo"]

CALLER = "cart"
CALLEE = "inventory"
VICTIM = "inventory-3"
#: Calls per second the simulated cart makes to inventory.
CALL_RATE = 10.0
#: Seconds the demo needs beyond TTL and lease TTLs: start-up, a calm moment, margins.
BASE_DURATION = 6.0
#: Bound on the story beyond ``--duration`` (only a hung broker or Redis call needs it).
STORY_GRACE = 20.0
#: Bound on deleting the namespace at the end.
CLEANUP_TIMEOUT = 30.0
#: Envs that must not reach the demo's workers (two of them share the host).
_CHILD_ENV_DROP = frozenset({"WORKER__METRICS_PORT", "WORKER__METRICS_HOST", "WORKER__WORKER_ID"})


def min_duration(settings: Settings) -> float:
    """Shortest ``--duration`` that leaves room for both crashes to be measured."""
    return BASE_DURATION + settings.client.ttl + 2 * settings.worker.lease_ttl


# --- subprocesses --------------------------------------------------------------------------------


@dataclass
class _Child:
    name: str
    proc: asyncio.subprocess.Process
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def tail(self, lines: int = 8) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return ""


class _Children:
    """The demo's subprocesses; ``close()`` ends whatever is still running."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self._env = env
        self._logdir = logdir
        self.all: list[_Child] = []

    async def spawn(self, name: str, *args: str) -> _Child:
        log_path = self._logdir / f"{name}.log"
        with _log_file(log_path) as logf:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "busreg",
                "--log-level",
                "WARNING",
                *args,
                env=self._env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=asyncio.subprocess.STDOUT,
            )
        child = _Child(name, proc, log_path)
        self.all.append(child)
        return child

    async def kill(self, child: _Child) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()
        await child.proc.wait()

    async def close(self) -> None:
        """SIGTERM every child still running (workers hand over), SIGKILL after 10 s."""
        running = [ch for ch in self.all if ch.alive]
        for ch in running:
            with contextlib.suppress(ProcessLookupError):
                ch.proc.terminate()
        for ch in running:
            try:
                async with asyncio.timeout(10):
                    await ch.proc.wait()
            except TimeoutError:
                await self.kill(ch)

    def crashed(self) -> list[_Child]:
        return [ch for ch in self.all if ch.proc.returncode not in (None, 0, -signal.SIGKILL)]


def _log_file(path: Path) -> BinaryIO:
    return path.open("wb")  # a local file: opening it does not block the loop noticeably


def _child_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("BUSREG_")}
    env.update(settings.to_env(exclude=_CHILD_ENV_DROP), PYTHONUNBUFFERED="1")
    return env


# --- what the screen shows -----------------------------------------------------------------------


@dataclass
class _Board:
    settings: Settings
    duration: float
    started: float = field(default_factory=time.monotonic)
    live: list[str] = field(default_factory=list)
    owners: dict[int, str | None] = field(default_factory=dict)
    registry: dict[str, tuple[int, list[Instance]]] = field(default_factory=dict)
    registry_error: str | None = None
    view: ServiceView | None = None
    balancer: RoundRobin | None = None
    calls: dict[str, list[int]] = field(default_factory=dict)
    unavailable: int = 0
    dead: set[str] = field(default_factory=set)
    events: deque[str] = field(default_factory=lambda: deque(maxlen=9))
    removed_at: float | None = None  # wall clock: the caller's view removed the victim
    detection: float | None = None
    takeover: float | None = None
    lines: list[str] = field(default_factory=list)  # the measured figures

    def t(self) -> float:
        return time.monotonic() - self.started

    def event(self, text: str, out: TextIO | None = None) -> None:
        line = f"t+{self.t():5.1f}s  {text}"
        self.events.append(line)
        if out is not None:  # plain output: events as they happen
            print(line, file=out, flush=True)


def _render(board: _Board) -> str:
    s = board.settings
    lines = [
        f"busreg demo  namespace {s.namespace}  {s.partitions} partitions  "
        f"TTL {s.client.ttl:g}s  heartbeat {s.client.heartbeat_interval:g}s  "
        f"lease {s.worker.lease_ttl:g}s        t+{board.t():4.1f}s of {board.duration:g}s",
        "",
        "WORKERS (partition leases in Redis)",
    ]
    holders = sorted({w for w in board.owners.values() if w} | set(board.live))
    for w in holders:
        parts = [str(k) for k, o in sorted(board.owners.items()) if o == w]
        state = "live" if w in board.live else "gone"
        lines.append(f"  {w:<12} {state:<5} partitions {' '.join(parts) or '-'}")
    free = [str(k) for k, o in sorted(board.owners.items()) if o is None]
    if free:
        lines.append(f"  {'(unowned)':<12} {'':<5} partitions {' '.join(free)}")
    lines += ["", "REGISTRY (instance tables the workers keep in Redis)"]
    if board.registry_error:
        lines.append(f"  (not readable: {board.registry_error})")
    for service, (revision, instances) in sorted(board.registry.items()):
        names = ", ".join(i.instance_id for i in instances) or "-"
        lines.append(f"  {service:<10} rev {revision:<4} {len(instances)} up: {names}")
    lines += ["", f"CALLER ({CALLER}'s live view of {CALLEE}, round robin, {CALL_RATE:g} calls/s)"]
    if board.view is not None and board.balancer is not None:
        ejected = board.balancer.ejected()
        lines.append(f"  view at rev {board.view.revision}")
        lines.append(f"  {'INSTANCE':<13} {'ADDRESS':<16} {'CALLS OK':>8} {'FAILED':>7}  NOTE")
        ids = sorted(set(board.view.instances) | set(board.calls))
        for iid in ids:
            inst = board.view.instances.get(iid)
            ok, failed = board.calls.get(iid, [0, 0])
            note = "not in view" if inst is None else ""
            if iid in ejected:
                note = (note + " ejected locally").strip()
            if iid in board.dead:
                note = (note + " (process killed)").strip()
            address = inst.address if inst is not None else "-"
            lines.append(f"  {iid:<13} {address:<16} {ok:>8} {failed:>7}  {note}")
        if board.unavailable:
            lines.append(f"  no instance available: {board.unavailable} calls")
    lines += ["", "EVENTS", *board.events]
    if board.lines:
        lines += ["", *board.lines]
    return "\n".join(lines)


def _summary(board: _Board) -> str:
    """One line for plain (non-terminal) output."""
    reg = " ".join(
        f"{svc}={len(inst)}@rev{rev}" for svc, (rev, inst) in sorted(board.registry.items())
    )
    owned: dict[str, int] = {}
    for o in board.owners.values():
        owned[o or "unowned"] = owned.get(o or "unowned", 0) + 1
    view = "-"
    if board.view is not None:
        view = f"rev{board.view.revision} [{', '.join(sorted(board.view.instances))}]"
    workers = " ".join(f"{w}:{n}" for w, n in sorted(owned.items()))
    return (
        f"t+{board.t():5.1f}s  registry {reg or '-'} | {CALLER} sees {CALLEE} {view} | "
        f"partitions {workers or '-'}"
    )


# --- background activities -----------------------------------------------------------------------


async def _poll_registry(board: _Board, store: PartitionStore) -> None:
    """What the registry holds, read straight from Redis (as the workers wrote it)."""
    s = board.settings
    while True:
        try:
            _, board.live = await store.heartbeat_worker("", 0)
            for k in range(s.partitions):
                holder = await store.owner(k)
                board.owners[k] = holder.split("|", 1)[0] if holder else None
            for service in (CALLEE, CALLER):
                rows = await store.snapshot(partition_for(service, s.partitions), service)
                board.registry[service] = (rows.revision, rows.instances)
            board.registry_error = None
        except BusregError as exc:
            board.registry_error = str(exc)
        await asyncio.sleep(0.2)


async def _follow(
    board: _Board, view: ServiceView, removed: asyncio.Event, out: TextIO | None
) -> None:
    """The caller's view, change by change; notes when the victim's removal arrives."""
    async for change in view.changes():
        why = f" ({change.reason})" if change.reason else ""
        board.event(
            f"{CALLER}'s view: {change.instance_id} {change.kind.value}{why}, "
            f"rev {change.revision}",
            out,
        )
        if change.kind is DeltaKind.REMOVED and change.instance_id == VICTIM:
            board.removed_at = time.time()
            removed.set()


async def _call(board: _Board, balancer: RoundRobin, out: TextIO | None) -> None:
    """Simulated calls: a killed process refuses connections, so the caller ejects it
    locally at its first failure, before the registry has expired it."""
    while True:
        try:
            inst = balancer.choose()
        except NoInstanceAvailable:
            board.unavailable += 1
        else:
            row = board.calls.setdefault(inst.instance_id, [0, 0])
            if inst.instance_id in board.dead:
                row[1] += 1
                until = balancer.eject(inst) - balancer.clock()
                if row[1] == 1:
                    board.event(
                        f"{CALLER}: call to {inst.instance_id} refused; ejected locally for "
                        f"{until:.0f}s (the registry still lists it)",
                        out,
                    )
            else:
                row[0] += 1
                balancer.record_success(inst)
        await asyncio.sleep(1 / CALL_RATE)


async def _draw(board: _Board, out: TextIO, tty: bool) -> None:
    while True:
        if tty:
            out.write("\x1b[H\x1b[2J" + _render(board) + "\n")
            out.flush()
            await asyncio.sleep(0.25)
        else:
            await asyncio.sleep(2.0)
            print(_summary(board), file=out, flush=True)


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
        with contextlib.suppress(Exception):  # a probe's consumer: closing is best effort
            await consumer.close()
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


async def run_demo(settings: Settings, *, duration: float = 30.0, out: TextIO | None = None) -> int:
    """Run the demo on ``settings``' brokers in a fresh namespace; 0 if both figures were
    measured. Ends after ``duration`` seconds (plus clean-up)."""
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
    board = _Board(settings, duration)
    tty = out.isatty()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            signals.append(sig)
    logdir = Path(tempfile.mkdtemp(prefix="busreg-demo-"))
    children = _Children(_child_env(settings), logdir)
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
        redis = await connect_redis(settings)
        try:
            store = PartitionStore(redis, settings.namespace)
            try:
                # the story keeps its own schedule; this only bounds a hung broker call
                async with asyncio.timeout(duration + STORY_GRACE):
                    ok = await _story(board, store, children, stop, out, tty)
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


def _where(settings: Settings) -> str:
    amqp = settings.amqp_url.rsplit("@", 1)[-1].rstrip("/")
    redis = settings.redis_url.rsplit("@", 1)[-1].split("://")[-1]
    return f"RabbitMQ {amqp}, Redis {redis}"


async def _story(
    board: _Board,
    store: PartitionStore,
    children: _Children,
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
                tg.create_task(_follow(board, view, removed, plain)),
                tg.create_task(_poll_registry(board, store)),
                tg.create_task(_call(board, balancer, plain)),
                tg.create_task(_draw(board, out, tty)),
            ]
            try:
                return await _crashes(
                    board, store, children, victim, workers, removed, stop, deadline, plain
                )
            finally:
                if tty:  # the final picture, figures included
                    out.write("\x1b[H\x1b[2J" + _render(board) + "\n")
                for task in tasks:
                    task.cancel()


async def _crashes(
    board: _Board,
    store: PartitionStore,
    children: _Children,
    victim: _Child,
    workers: list[_Child],
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
        print(_summary(board), file=plain)
        for line in board.lines:
            print(line, file=plain, flush=True)
    return board.detection is not None and board.takeover is not None


def _failed(what: str, children: list[_Child]) -> str:
    tails = "\n".join(f"--- {ch.name}:\n{ch.tail()}" for ch in children)
    return f"demo failed: {what}\n{tails}"
