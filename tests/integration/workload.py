"""What the multi-process fault tests know to be true, and what they count against it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from busreg import DeltaKind, Registry, Settings, Snapshot
from busreg import constants as c
from busreg.client.registration import Registration
from busreg.client.view import ServiceView
from busreg.errors import ConnectionFailed, PublishFailed
from busreg.server.store import PartitionStore
from busreg.tasks import cancel_until_done
from busreg.transport.connections import connect_amqp, connect_redis


@dataclass
class Fleet:
    """What the test knows to be true: which instances are alive, and since when."""

    alive: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (service, since)
    ended: dict[str, float] = field(default_factory=dict)  # id -> when it stopped
    heartbeating: set[str] = field(default_factory=set)  # alive and never abandoned
    regs: dict[str, Registration] = field(default_factory=dict)


@dataclass
class Tally:
    revisions: set[tuple[str, str, int]] = field(default_factory=set)  # service, epoch, rev
    false_expiries: list[str] = field(default_factory=list)
    phantom_adds: list[str] = field(default_factory=list)
    missing_live: list[str] = field(default_factory=list)
    removed_seen: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    contents: dict[tuple[str, str, int], str] = field(default_factory=dict)
    #: one (service, epoch, revision) delivered with two different contents
    conflicts: list[str] = field(default_factory=list)

    def record(self, service: str, epoch: str, revision: int, content: str) -> None:
        key = (service, epoch, revision)
        self.revisions.add(key)
        seen = self.contents.setdefault(key, content)
        if seen != content:
            self.conflicts.append(f"{key}: {seen} / {content}")


def judge(fleet: Fleet, tally: Tally, who: str, kind: DeltaKind, iid: str, reason: str) -> None:
    now = time.monotonic()
    if kind is DeltaKind.ADDED:
        ended = fleet.ended.get(iid)
        # a correct registry may still list a dead instance until its TTL ran out
        dead_long = ended is not None and now > ended + 3.0 + 3.0
        if dead_long or iid in tally.removed_seen[who]:
            tally.phantom_adds.append(f"{who}: {iid} @{now:.2f}")
    elif kind is DeltaKind.REMOVED:
        tally.removed_seen[who].add(iid)
        if iid in fleet.heartbeating:
            (tally.false_expiries if reason == "expired" else tally.missing_live).append(
                f"{who}: {iid} ({reason}) @{now:.2f}"
            )


class Observers:
    """A watcher and a consumer-group member per service, every delta judged against the
    fleet (``judge``) and recorded in the tally, as the long fault scenarios need them.

    ``async with Observers(registry, services, "group", fleet, tally) as obs:`` opens the
    views and starts following; on exit the followers are stopped."""

    def __init__(
        self, registry: Registry, services: list[str], group: str, fleet: Fleet, tally: Tally
    ) -> None:
        self.registry = registry
        self.services = services
        self.group = group
        self.fleet = fleet
        self.tally = tally
        self.views: dict[str, ServiceView] = {}
        self.removed_at: dict[str, float] = {}
        #: acks that failed because the node went with the channel (redelivered later)
        self.ack_failures: Counter[str] = Counter()
        self._ready = {s: asyncio.Event() for s in services}
        self._progress = asyncio.Condition()  # notified on every group delivery
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Observers:
        for s in self.services:
            self.views[s] = await self.registry.watch(s, resync_interval=None)
        for s in self.services:
            self._tasks.append(asyncio.create_task(self._follow_group(s)))
            self._tasks.append(asyncio.create_task(self._follow_view(s)))
        async with asyncio.timeout(20):
            for event in self._ready.values():
                await event.wait()  # declared: each group gets every delta from now on
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_until_done(self._tasks)
        for task in self._tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _follow_group(self, service: str) -> None:
        async with self.registry.consume_group(service, self.group) as messages:
            self._ready[service].set()
            async for message in messages:
                d = message.delta
                content = f"{d.kind}:{d.instance.model_dump_json()}"
                self.tally.record(service, d.epoch, d.revision, content)
                iid = d.instance.instance_id
                judge(self.fleet, self.tally, f"group {service}", d.kind, iid, d.reason or "")
                try:
                    await message.ack()
                except ConnectionFailed:
                    # the node went with the channel: the broker redelivers it (at least
                    # once), and the iterator goes on on another node
                    self.ack_failures[service] += 1
                async with self._progress:
                    self._progress.notify_all()

    async def _follow_view(self, service: str) -> None:
        async for ch in self.views[service].changes():
            if ch.kind is DeltaKind.REMOVED:
                self.removed_at.setdefault(ch.instance_id, time.monotonic())
            who = f"view {service}"
            judge(self.fleet, self.tally, who, ch.kind, ch.instance_id, ch.reason or "")

    def wanted(self, service: str) -> set[str]:
        return {i for i, (s, _) in self.fleet.alive.items() if s == service}

    async def settled(self, timeout: float) -> None:
        """Every view holds exactly the live instances of its service."""
        for service in self.services:
            want = self.wanted(service)
            view = self.views[service]
            try:
                await view.wait_for(lambda i, w=want: set(i) == w, timeout=timeout)
            except TimeoutError:
                have = set(view.instances)
                raise AssertionError(
                    f"{service}: view (epoch {view.epoch} rev {view.revision}) lacks "
                    f"{sorted(want - have)}, has extra {sorted(have - want)}; false expiries "
                    f"{self.tally.false_expiries[:5]}, missing {self.tally.missing_live[:5]}"
                ) from None

    async def final_check(self, timeout: float) -> tuple[dict[str, Snapshot], int]:
        """Fresh snapshots; waits until the groups saw each one's revision, checks every
        snapshot lists the live instances and every view equals it; returns (snapshots,
        gaps): revisions missing in any epoch from 1 to the highest seen, and in the
        current epoch up to the snapshot's."""
        snapshots = {s: await self.registry.snapshot(s) for s in self.services}

        def caught_up() -> bool:
            return all(
                (s, snap.epoch, snap.revision) in self.tally.revisions
                for s, snap in snapshots.items()
            )

        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(caught_up)
        for service, snap in snapshots.items():
            listed = {i.instance_id for i in snap.instances}
            want = self.wanted(service)
            assert listed == want, (service, snap.epoch, snap.revision, sorted(listed ^ want))
            assert set(self.views[service].instances) == listed
        epochs: dict[tuple[str, str], set[int]] = defaultdict(set)
        for service, epoch, revision in self.tally.revisions:
            epochs[(service, epoch)].add(revision)
        gaps = 0
        for (service, epoch), seen in epochs.items():
            top = max(seen)
            if epoch == snapshots[service].epoch:
                top = max(top, snapshots[service].revision)
            gaps += top - len(seen & set(range(1, top + 1)))
        return snapshots, gaps

    def assert_clean(self, gaps: int) -> None:
        t = self.tally
        assert t.false_expiries == []
        assert t.missing_live == []
        assert t.phantom_adds == []
        assert t.conflicts == []
        assert gaps == 0, gaps


async def register(
    fleet: Fleet, apps: Registry, service: str, iid: str, *, patience: float = 0.0
) -> int:
    """Register ``iid`` (confirmed) and count it alive and heartbeating. With ``patience``,
    a registration that fails (``PublishFailed`` after ``confirm_timeout``: its stream had
    no leader that long) is made again, as an app would, until ``patience`` seconds have
    passed; returns how many attempts failed."""
    deadline = time.monotonic() + patience
    failed = 0
    while True:
        try:
            fleet.regs[iid] = await apps.register(
                service, address=f"127.0.0.1:{20000 + len(fleet.regs) % 40000}", instance_id=iid
            )
            break
        except PublishFailed:
            failed += 1
            if time.monotonic() > deadline:
                raise
    fleet.alive[iid] = (service, time.monotonic())
    fleet.heartbeating.add(iid)
    return failed


async def end(fleet: Fleet, iid: str, *, crash: bool) -> None:
    """Deregister ``iid`` or, with ``crash``, stop its heartbeats (it will expire)."""
    fleet.heartbeating.discard(iid)
    reg = fleet.regs.pop(iid)
    if crash:
        reg.abandon()
    else:
        await reg.deregister()
    fleet.alive.pop(iid)
    fleet.ended[iid] = time.monotonic()


def run_script(script: Path, env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        ["bash", str(script), *args], env=env, check=True, timeout=180, capture_output=True
    )
    return out.stdout.decode().strip()


async def arun_script(script: Path, env: dict[str, str], *args: str) -> str:
    """``run_script`` off the event loop: a node restart takes seconds, and a blocked loop
    would stall the test process's heartbeats past their TTL."""
    return await asyncio.to_thread(run_script, script, env, *args)


@contextlib.contextmanager
def brokers_script(script: Path, tmp_path: Path, **extra: str) -> Iterator[dict[str, str]]:
    """``script start`` with its state under ``tmp_path`` and ``extra`` environment
    variables (ports); ``script stop`` at the end."""
    env = {**os.environ, "BUSREG_BROKERS_STATE": str(tmp_path / "brokers"), **extra}
    try:
        run_script(script, env, "start")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"{script.name} start failed: {exc}")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(script), "stop"], env=env, check=False, timeout=120)


async def delete_groups(settings: Settings, services: list[str], group: str) -> None:
    """The namespace cleanup knows services, not their groups."""
    conn = await connect_amqp(settings, "test-group-cleanup")
    try:
        channel = await conn.channel()
        for service in services:
            await channel.queue_delete(c.group_queue(settings.namespace, service, group))
    finally:
        await conn.close()


class OwnershipAuditor:
    """Samples every lease in Redis all through a test: a fencing token must belong to one
    worker only (invariant 3), and, unless ``monotonic`` is off, the tokens of a partition
    must only ever grow. A Redis failover may lose the last acquisition's ``HINCRBY`` and
    hand out the same number again (the nonce keeps tokens apart), so failover tests turn
    ``monotonic`` off and set ``outages`` on: a sample that fails is counted and skipped."""

    def __init__(
        self, settings: Settings, *, monotonic: bool = True, outages: bool = False
    ) -> None:
        self.settings = settings
        self.monotonic = monotonic
        self.outages = outages
        self.seen: dict[tuple[int, str], str] = {}
        self.last: dict[int, int] = {}
        self.samples = 0
        self.failed_samples = 0
        self.violations: list[str] = []
        # stopped by an event, not by cancel(): on Python 3.11 a cancel that races a redis
        # call's internal wait_for can be lost (CPython gh-86296), and the audit ran for ever
        self.stop = asyncio.Event()

    async def run(self) -> None:
        redis = await connect_redis(self.settings)
        store = PartitionStore(redis, self.settings.namespace)
        try:
            while not self.stop.is_set():
                try:
                    await self._sample(store)
                except ConnectionFailed:
                    if not self.outages:
                        raise
                    self.failed_samples += 1
                await asyncio.sleep(0.01)  # sampling rate of the audit
        finally:
            await redis.aclose()

    async def _sample(self, store: PartitionStore) -> None:
        for k in range(self.settings.partitions):
            holder = await store.owner(k)
            if holder is None:
                continue
            worker, token = holder.split("|", 1)
            # "<epoch>/<n>.<nonce>": n grows per acquisition
            n = int(token.rsplit("/", 1)[1].split(".", 1)[0])
            if self.seen.setdefault((k, token), worker) != worker:
                self.violations.append(f"token {token} of {k} held by two workers")
            if self.monotonic and n < self.last.get(k, 0):
                self.violations.append(f"token of {k} went back to {n}")
            self.last[k] = n
        self.samples += 1


@contextlib.asynccontextmanager
async def auditing(auditor: OwnershipAuditor) -> AsyncIterator[OwnershipAuditor]:
    """Run ``auditor`` for the duration of the block, and stop it however the block ends."""
    async with asyncio.TaskGroup() as tg:
        tg.create_task(auditor.run())
        try:
            yield auditor
        finally:
            auditor.stop.set()
