"""The demo's live board: what the screen shows (the table on a terminal, one summary line
otherwise) and the background activities that keep it current: reading the registry from
Redis, following the caller's view, making the simulated calls, redrawing."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TextIO

from busreg.callers.balancer import RoundRobin
from busreg.client.view import ServiceView
from busreg.errors import BusregError, NoInstanceAvailable
from busreg.server.store import PartitionStore
from busreg.settings import Settings
from busreg.wire.models import DeltaKind, Instance
from busreg.wire.routing import partition_for

__all__ = [
    "CALLEE",
    "CALLER",
    "CALL_RATE",
    "VICTIM",
    "Board",
    "board_summary",
    "draw",
    "follow_view",
    "make_calls",
    "poll_registry",
    "render_board",
]

CALLER = "cart"
CALLEE = "inventory"
VICTIM = "inventory-3"
#: Calls per second the simulated cart makes to inventory.
CALL_RATE = 10.0


@dataclass
class Board:
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


def render_board(board: Board) -> str:
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


def board_summary(board: Board) -> str:
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


async def poll_registry(board: Board, store: PartitionStore) -> None:
    """What the registry holds, read straight from Redis (as the workers wrote it)."""
    s = board.settings
    while True:
        try:
            _, board.live = await store.live_workers()
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


async def follow_view(
    board: Board, view: ServiceView, removed: asyncio.Event, out: TextIO | None
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


async def make_calls(board: Board, balancer: RoundRobin, out: TextIO | None) -> None:
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


async def draw(board: Board, out: TextIO, tty: bool) -> None:
    while True:
        if tty:
            out.write("\x1b[H\x1b[2J" + render_board(board) + "\n")
            out.flush()
            await asyncio.sleep(0.25)
        else:
            await asyncio.sleep(2.0)
            print(board_summary(board), file=out, flush=True)
