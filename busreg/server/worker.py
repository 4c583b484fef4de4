"""The shard worker: owns partitions by lease, runs one PartitionRunner per owned partition,
and answers snapshot/list requests for any partition.

Workers are stateless: everything lives in Redis (state, offsets, outbox, leases) and in
the stream. Any number can run; each partition is owned by one live worker at a time and
the others stand by (the seed's master/slave shard groups, with Redis as the controller):

* membership: every worker refreshes itself in a live set (expiry on Redis' clock);
* assignment: partition k belongs to the (k mod W)-th live worker in id order, so every
  worker owns ⌊P/W⌋ or ⌈P/W⌉ partitions once membership is stable;
* a worker acquires its assigned partitions when their lease is free, hands over the ones no
  longer assigned to it (drain, commit, release) and stops at once on a partition whose lease
  it lost (fenced: its writes are refused by the scripts anyway).

Shutdown is two-phase (arq style): stop taking work (leave the live set, stop consuming),
apply and publish what was read within ``drain_timeout``, release leases, then cancel.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Self

from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from busreg import constants as c
from busreg.backoff import Backoff, retrying
from busreg.errors import AuthenticationFailed, BusregError, ClosedError, ConnectionFailed, Fenced
from busreg.server.assignment import assigned
from busreg.server.membership import Membership, Owned
from busreg.server.metrics import WorkerMetrics
from busreg.server.notices import PeerNotices
from busreg.server.rpc_server import RpcServer
from busreg.server.runner import PartitionRunner
from busreg.server.stats import PartitionStats, WorkerStatus
from busreg.server.store import PartitionStore
from busreg.server.ticker import OutageMarks, StandbyTicker
from busreg.settings import Settings
from busreg.tasks import cancel_until_done, close_quietly, waiting_in
from busreg.transport.connections import (
    RedisClient,
    connect_amqp,
    connect_redis,
    stream_consumer,
    translate,
)
from busreg.transport.streams import StreamWriter
from busreg.transport.topology import verify_partitions

__all__ = ["Worker", "WorkerStatus"]

log = logging.getLogger("busreg.worker")

#: The control loop runs after every membership round (a new live set) and, while
#: something is under way (an acquisition, a handover, a partition backing off), this often;
#: a round makes no Redis call. Otherwise it sleeps: an idle worker wakes for nothing.
CONTROL_INTERVAL = 0.1


#: Pauses before a worker tries again a partition that failed (broker down, stream missing),
#: so a persistent fault does not become a tight failure loop.
PARTITION_BACKOFF = Backoff(first=0.2, cap=2.0)


class Worker:
    """A shard worker. ``async with Worker(settings) as w: await w.run()``."""

    def __init__(self, settings: Settings, *, worker_id: str | None = None) -> None:
        self.settings = settings
        self.worker_id = (
            worker_id
            or settings.worker.worker_id
            or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"
        )
        self._stopping = asyncio.Event()
        self._closed = False
        self._opened = False
        self._owned: dict[int, Owned] = {}
        self._redis: RedisClient | None = None
        self._amqp: AbstractRobustConnection | None = None
        self._ticks: StreamWriter | None = None
        self._publish_channel: AbstractChannel | None = None
        self.store: PartitionStore | None = None
        #: counters of this worker's finished partition runners (metrics stay monotonic
        #: across handovers)
        self._retired: dict[int, PartitionStats] = {}
        self.metrics: WorkerMetrics | None = None
        self._rpc: RpcServer | None = None
        self._standby: StandbyTicker | None = None
        self._marks: OutageMarks | None = None
        self._ownership = asyncio.Condition()
        # partition -> (monotonic time before which we do not retry it, failures so far)
        self._backoff: dict[int, tuple[float, int]] = {}
        #: partitions whose acquisition is under way (one task each, in parallel)
        self._acquiring: dict[int, asyncio.Task[None]] = {}
        self._membership: Membership | None = None
        self._notices: PeerNotices | None = None

    async def __aenter__(self) -> Self:
        if self._closed or self._opened:
            raise ClosedError("a Worker can be entered once; create a new one")
        self._opened = True
        try:
            await retrying(
                self._connect,
                what=f"worker {self.worker_id} start",
                log=log,
                backoff=PARTITION_BACKOFF,
                retry_on=(ConnectionFailed,),
                fatal=(AuthenticationFailed,),
                deadline=c.WORKER_START_TIMEOUT,
            )
        except BaseException:
            await self._close()
            raise
        return self

    async def _connect(self) -> None:
        """Open Redis, AMQP and a stream probe; on any failure close what was opened."""
        try:
            self._redis = await connect_redis(self.settings)
            self.store = PartitionStore(self._redis, self.settings.namespace)
            await self._check_info()
            self._amqp = await connect_amqp(self.settings, f"busreg-worker {self.worker_id}")
            await verify_partitions(self._amqp, self.settings)
            with translate("open publish channel"):
                self._publish_channel = await self._amqp.channel(publisher_confirms=True)
            self._rpc = RpcServer(self.settings, self.store, self._amqp, self._publish_channel)
            # fail at start, with one clear error, if the stream port is unreachable
            probe = await stream_consumer(self.settings, "busreg-worker-probe")
            await close_quietly(probe.close, "stream probe")
            self._ticks = StreamWriter(
                self.settings,
                f"busreg-ticks-{self.worker_id}",
                on_disrupted=self._note_disrupted,
            )
            self._marks = OutageMarks(self.settings, self._ticks, self.worker_id)
            self._membership = Membership(self.settings, self.store, self.worker_id, self._owned)
            self._standby = StandbyTicker(
                self.settings, self._ticks, self.worker_id, self._standby_partitions
            )
            self._notices = PeerNotices(
                self.settings,
                self._amqp,
                self._publish_channel,
                self.worker_id,
                on_notice=self._membership.poke,
            )
        except BaseException:
            await self._release_connections()
            raise

    async def _check_info(self) -> None:
        """apply.lua reads master_replid to notice a failover (see there); say once if the
        Redis user may not, rather than lose that check in silence."""
        assert self._redis is not None
        try:
            with translate("Redis INFO replication"):
                await self._redis.info("replication")
        except AuthenticationFailed:
            log.warning(
                "the Redis user may not run INFO: a failover that loses acknowledged writes "
                "cannot be detected (no new epoch, subscribers keep revisions that may be "
                "issued again); grant it +info"
            )

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        self._closed = True
        await self._release_connections()

    async def _release_connections(self) -> None:
        ticks, self._ticks = self._ticks, None
        amqp, self._amqp = self._amqp, None
        redis, self._redis = self._redis, None
        if ticks is not None:
            await close_quietly(ticks.close, "tick writer")
        if amqp is not None:
            await close_quietly(amqp.close, "worker AMQP connection")
        if redis is not None:
            await close_quietly(redis.aclose, "worker Redis connection")

    def _standby_partitions(self) -> set[int]:
        """Those we do not tick as owner; once we read the live set, only those with leases."""
        ticking = {k for k, o in self._owned.items() if o.runner.ticking}
        m = self._membership
        wanted = m.busy if m and m.joined.is_set() else range(self.settings.partitions)
        return set(wanted) - ticking

    def _note_disrupted(self, streams: list[str]) -> None:
        if self._marks is not None:
            self._marks.note(streams)

    async def _on_stream_closed(self, info: Any) -> None:
        # rstream does not resubscribe by itself (and must not: it would resume from its own
        # position). Fail the affected runners; the control loop takes the partitions again
        # and resubscribes from the committed offsets.
        streams = set(getattr(info, "streams", None) or [])
        reason = getattr(info, "reason", "connection closed")
        for owned in list(self._owned.values()):
            if not streams or owned.runner.stream in streams:
                owned.runner.fail(ConnectionFailed(f"stream connection lost: {reason}"))
        # our partitions' streams moved or lost a node: so did their writers' way there
        self._note_disrupted(sorted(streams or {o.runner.stream for o in self._owned.values()}))
        log.warning("stream connection lost worker=%s streams=%s", self.worker_id, sorted(streams))

    def stop(self) -> None:
        """Begin a graceful stop (safe from a signal handler)."""
        self._stopping.set()

    async def wait_owned(self, predicate: Callable[[set[int]], bool]) -> set[int]:
        """Wait until ``predicate(owned partitions)`` holds (wrap in asyncio.timeout)."""
        async with self._ownership:
            await self._ownership.wait_for(lambda: predicate(set(self._owned)))
            return set(self._owned)

    async def _ownership_changed(self) -> None:
        async with self._ownership:
            self._ownership.notify_all()

    @property
    def snapshot_requests(self) -> int:
        """Snapshot and service-list requests this worker answered."""
        return 0 if self._rpc is None else self._rpc.requests

    def status(self) -> WorkerStatus:
        return WorkerStatus(
            self.worker_id,
            [] if self._membership is None else list(self._membership.live),
            {k: o.runner.stats for k, o in self._owned.items()},
        )

    def retired_stats(self) -> dict[int, PartitionStats]:
        """Summed counters of the runners this worker had and no longer has, per partition."""
        return dict(self._retired)

    def _retire(self, runner: PartitionRunner) -> None:
        self._retired.setdefault(runner.partition, PartitionStats()).add(runner.stats)

    # --- main -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until ``stop()``; then hand every partition over and return."""
        if not self._opened or self._closed:
            raise ClosedError("use `async with Worker(...)` before run()")
        if self.settings.auth.mode == "off":
            log.warning(
                "auth is OFF (development default): any client may register, heartbeat or "
                "deregister any service; set BUSREG_AUTH__MODE=enforce and BUSREG_AUTH__SECRET"
            )
        if self.settings.worker.metrics_port is not None:
            assert self.store is not None
            self.metrics = WorkerMetrics(self)
            self.store.observe_apply = self.metrics.observe_apply
            await self.metrics.start()  # a busy port fails here, before any work
            log.info(
                "metrics on http://%s:%d/metrics worker=%s",
                self.metrics.host,
                self.metrics.port,
                self.worker_id,
            )
        # only now: a worker that cannot serve its metrics never claimed to have started
        log.info(
            "worker started worker=%s namespace=%s partitions=%d",
            self.worker_id,
            self.settings.namespace,
            self.settings.partitions,
        )
        try:
            await self._serve()
        finally:
            if self.metrics is not None:
                await self.metrics.close()
        log.info("worker stopped worker=%s", self.worker_id)

    async def _serve(self) -> None:
        assert self._rpc is not None
        assert self._standby is not None
        assert self._marks is not None
        assert self._membership is not None
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            rpc = tg.create_task(self._rpc.serve(), name="rpc")
            assert self._notices is not None
            notices = tg.create_task(self._notices.serve(asyncio.Event()), name="notices")
            members = self._membership
            tells = tg.create_task(
                self._notices.tell_when_asked(lambda: members.live), name="notices-out"
            )
            # Able to stand by before joining: a worker that has just joined may be the
            # only other one left when an owner dies, and its first ticks used to take over
            # a second (publishers are declared on first use), long enough to open the
            # outage grace on the partitions it was about to take over.
            await self._standby.tick_once(timeout=c.WORKER_BROKER_TIMEOUT)
            # stops with phase 1: a leaving worker's ticks would only add noise
            tg.create_task(self._standby.run(self._stopping), name="standby-ticks")
            tg.create_task(self._marks.run(self._stopping), name="outage-marks")
            membership = tg.create_task(self._membership.run(), name="membership")
            await self._control_loop()
            # phase 1: stop taking work; others may take our partitions once released. The
            # membership task stops heartbeating but keeps renewing the leases we still
            # hold, so a long drain is not cut short by a lease that lapsed meanwhile.
            self._membership.leave()
            try:
                assert self.store is not None
                await self.store.leave(self.worker_id)
            except BusregError as exc:
                log.warning("leave failed: %s", exc)
            if self._acquiring:
                # each releases what it got once it sees we are stopping
                await asyncio.wait(self._acquiring.values(), timeout=c.WORKER_BROKER_TIMEOUT)
                await cancel_until_done(list(self._acquiring.values()))
            for owned in self._owned.values():
                owned.runner.stop()
            # phase 2: drain with a deadline, then cancel what is left
            tasks = [o.task for o in self._owned.values()]
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=self.settings.worker.drain_timeout)
                for task in pending:
                    name = task.get_name()
                    held = waiting_in("-" + name.rpartition("-")[2])
                    log.warning("drain deadline passed; cancelling %s (in: %s)", name, held)
                await cancel_until_done(pending)
            # our partitions are free: the others take them now, not at their next round
            await self._notices.tell(self._membership.live)
            await cancel_until_done([rpc, membership, notices, tells])

    # --- assignment: handovers and acquisitions ---------------------------------------------

    async def _control_loop(self) -> None:
        # no Redis or broker call in here: acquisitions run on their own tasks (in
        # parallel) and membership on its own, so one slow call holds up nothing else
        assert self._membership is not None
        joined = self._membership.joined
        waits = [asyncio.ensure_future(e.wait()) for e in (joined, self._stopping)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_until_done(waits)
        lease_ms = int(self.settings.worker.lease_ttl * 1000)
        while not self._stopping.is_set():
            mine = self._assigned()
            now = time.monotonic()
            for k, owned in list(self._owned.items()):
                if owned.lost:
                    owned.task.cancel()  # every round until it ends: a cancel can be lost
                elif k not in mine and not owned.handing_over:
                    log.info("partition handover partition=%d worker=%s", k, self.worker_id)
                    owned.handing_over = True
                    owned.handover_deadline = now + self.settings.worker.drain_timeout
                    owned.runner.stop()
                elif owned.handing_over and now > owned.handover_deadline:
                    # A runner stuck on the broker (a request or confirm that never comes)
                    # must not keep the partition from its new owner. Cutting it short is
                    # exact: what it applied is committed with its offset and outbox, and
                    # the next owner reads and publishes the rest.
                    if not owned.cut_short:
                        owned.cut_short = True
                        log.warning(
                            "partition handover overran partition=%d worker=%s after=%.1fs",
                            k,
                            self.worker_id,
                            self.settings.worker.drain_timeout,
                        )
                    owned.task.cancel()  # every round until it ends: a cancel can be lost
            for k in sorted(mine - self._owned.keys() - self._acquiring.keys()):
                if self._backoff.get(k, (0.0, 0))[0] <= now:
                    self._acquiring[k] = self._tg.create_task(
                        self._acquire(k, lease_ms), name=f"acquire-{k}"
                    )
            pending = (
                bool(self._acquiring)
                or any(t > now for t, _ in self._backoff.values())
                or any(o.handing_over or o.lost for o in self._owned.values())
            )
            changed = self._membership.changed
            changed.clear()
            # a timer, woken by a new live set or stop(); not synchronisation
            waits = [asyncio.ensure_future(e.wait()) for e in (changed, self._stopping)]
            try:
                await asyncio.wait(
                    waits,
                    timeout=CONTROL_INTERVAL if pending else self.settings.worker.lease_ttl,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                await cancel_until_done(waits)

    def _assigned(self) -> set[int]:
        live = [] if self._membership is None else self._membership.live
        return assigned(live, self.worker_id, self.settings.partitions)

    async def _acquire(self, k: int, lease_ms: int) -> None:
        """Take partition ``k`` if its lease is free, and start its runner.

        If the acquisition ran but its reply was lost, the lease is ours under a token we
        never saw; the next attempt replaces it (acquire.lua gives a worker its own lease
        again, with a new token), or it lapses within ``lease_ttl``."""
        assert self.store is not None
        try:
            try:
                async with asyncio.timeout(c.WORKER_BROKER_TIMEOUT):
                    lease = await self.store.acquire(k, self.worker_id, lease_ms)
            except TimeoutError as exc:
                raise ConnectionFailed(f"acquire partition {k}: no reply") from exc
        except BusregError as exc:
            self._acquiring.pop(k, None)
            self._back_off(k, exc)
            return
        if lease is None:
            self._acquiring.pop(k, None)
            return
        if self._stopping.is_set():
            self._acquiring.pop(k, None)
            await close_quietly(partial(self.store.release, lease), "release of a late lease")
            return
        log.info(
            "partition acquired partition=%d worker=%s token=%s offset=%d",
            k,
            self.worker_id,
            lease.token,
            lease.offset,
        )
        assert self._ticks is not None
        # one stream connection per owned partition: on a shared one, deliveries of one
        # partition wait behind the others' (measured: register -> watcher p50 267 ms over
        # 8 partitions at 10k heartbeats/s, 3.4 ms with a connection each)
        connect = partial(
            stream_consumer,
            self.settings,
            f"busreg-worker-{self.worker_id}-p{k}",
            on_close=self._on_stream_closed,
        )
        runner = PartitionRunner(
            lease,
            self.settings,
            self.store,
            connect,
            self._ticks,
            self.worker_id,  # deltas go out on the runner's own connection, not ours
        )
        task = self._tg.create_task(self._run_partition(runner), name=f"partition-{k}")
        # owned before no longer acquiring, with no await between: the control loop never
        # sees k in neither (it would acquire again and fence this runner)
        self._owned[k] = Owned(runner, task)
        self._acquiring.pop(k, None)
        await self._ownership_changed()

    def _back_off(self, k: int, exc: BusregError) -> None:
        failures = self._backoff.get(k, (0.0, 0))[1]
        delay = PARTITION_BACKOFF.delay(failures)
        self._backoff[k] = (time.monotonic() + delay, failures + 1)
        log.error(
            "partition failed partition=%d worker=%s retry_in=%.1fs: %s",
            k,
            self.worker_id,
            delay,
            exc,
        )

    async def _run_partition(self, runner: PartitionRunner) -> None:
        assert self.store is not None
        k = runner.partition
        fenced = False
        try:
            await runner.run()
        except Fenced as exc:
            fenced = True
            log.warning("partition fenced partition=%d worker=%s: %s", k, self.worker_id, exc)
        except BusregError as exc:
            self._back_off(k, exc)  # released below so a healthier worker may take it
        else:
            self._backoff.pop(k, None)
        finally:
            self._retire(runner)
            owned = self._owned.get(k)
            if owned is not None and owned.runner is runner:
                fenced = fenced or owned.lost  # nothing to release: it is someone else's
                del self._owned[k]
            await self._ownership_changed()
            # release first, close after: a standby may take the partition at once, while
            # closing an rstream connection takes a while (it sleeps 0.2 s)
            if not fenced:
                try:
                    await self.store.release(runner.lease)
                    log.info("partition released partition=%d worker=%s", k, self.worker_id)
                    if not self._stopping.is_set() and self._notices is not None:
                        self._notices.soon()  # a handover: its new owner takes it now
                except BusregError as exc:
                    log.warning("release failed partition=%d: %s", k, exc)
            if runner.consumer is not None:
                await close_quietly(runner.consumer.close, "partition consumer")
