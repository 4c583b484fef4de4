"""The gateway's live catalog: every service's instances, served from memory.

    catalog = Catalog(registry, settings.gateway)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(catalog.run())      # discovery + one view per service, until cancelled

Discovery reads the service list (``Registry.services()``) every ``gateway.refresh``
seconds and watches each new service (``Registry.watch``). Each service's entry is a copy
of its view's state taken at the moment the catalog subscribed to ``view.changes()``, moved
forward only by the changes it consumes: so an entry, its revision and the changes fanned
out from it always agree (a view read directly could be ahead of the changes still queued
for us). Requests read entries; nothing here touches Redis or the workers per request.

Three counters, all monotonic within the process:
* ``seq``: one per change (the dashboard's ``id:`` and the changes log);
* ``generation``: one per mutation of anything an answer is made from (changes, a service
  appearing, a revision adopted after an empty resync): blocking queries wait on it;
* answer indexes (``AnswerIndex``): per answer, the generation at which that answer's
  content last changed (Consul's ``X-Consul-Index``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from busreg.backoff import RetryLog
from busreg.client.registry import Registry
from busreg.client.revisions import Change
from busreg.client.view import ServiceView
from busreg.errors import BusregError
from busreg.settings import GatewaySettings
from busreg.wire.models import DeltaKind, Instance

__all__ = [
    "AnswerIndex",
    "Catalog",
    "Entry",
    "Event",
    "StreamsFull",
    "Subscriber",
    "count_by",
]

log = logging.getLogger("busreg.gateway.catalog")


class StreamsFull(Exception):
    """``gateway.max_streams`` SSE streams are open already."""


# --- pure parts -------------------------------------------------------------------------------


def count_by(instances: Iterable[Instance], attribute: str) -> dict[str, int]:
    """Instances per value of ``attribute`` ("status" or "zone"), keys sorted.

    >>> from busreg.wire.models import Instance
    >>> a = Instance(service="s", instance_id="a", incarnation=1, address="h:1", zone="z1")
    >>> count_by([a, a.model_copy(update={"instance_id": "b"})], "zone")
    {'z1': 2}
    """
    counts = Counter(
        str(getattr(getattr(i, attribute), "value", getattr(i, attribute))) for i in instances
    )
    return dict(sorted(counts.items()))


def digest(answer: object) -> bytes:
    """A fingerprint of a JSON-able answer (key order normalised)."""
    return hashlib.blake2b(
        orjson.dumps(answer, option=orjson.OPT_SORT_KEYS), digest_size=16
    ).digest()


class AnswerIndex:
    """Consul-style indexes: per answer key, the generation at which its content changed.

    The index of an answer moves exactly when its content (``digest``) differs from the
    last one computed for that key, and then to the current generation. Generations only
    grow and every content change implies a mutation (so a generation bump) since the last
    computation, so each key's index only grows, and is never above the generation: a key
    forgotten (the table is bounded against clients inventing keys) and seen again starts
    at the current generation, which is at or above anything it was given before.
    """

    def __init__(self, max_keys: int = 10_000) -> None:
        self._known: OrderedDict[Hashable, tuple[bytes, int]] = OrderedDict()
        self._max = max_keys

    def index(self, key: Hashable, fingerprint: bytes, generation: int) -> int:
        known = self._known.get(key)
        if known is not None and known[0] == fingerprint:
            self._known.move_to_end(key)
            return known[1]
        value = max(1, generation)
        self._known[key] = (fingerprint, value)
        self._known.move_to_end(key)
        while len(self._known) > self._max:
            self._known.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._known)


# --- state ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Entry:
    """One service as the catalog serves it."""

    service: str
    epoch: str | None
    revision: int
    instances: dict[str, Instance]
    #: instance_id -> Instance JSON (with since/changed), kept ready for requests
    json: dict[str, dict[str, Any]] = field(default_factory=dict)
    since: dict[str, float] = field(default_factory=dict)
    changed: dict[str, float] = field(default_factory=dict)

    def instance_json(self, instance_id: str) -> dict[str, Any]:
        return self.json[instance_id]

    def summary(self) -> dict[str, Any]:
        values = self.instances.values()
        return {
            "service": self.service,
            "epoch": self.epoch,
            "revision": self.revision,
            "instances": len(self.instances),
            "by_status": count_by(values, "status"),
            "by_zone": count_by(values, "zone"),
        }

    def detail(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "epoch": self.epoch,
            "revision": self.revision,
            "instances": [self.json[i] for i in sorted(self.json)],
        }

    def put(self, instance: Instance, now: float) -> None:
        iid = instance.instance_id
        old = self.instances.get(iid)
        if old is None or old.incarnation != instance.incarnation:
            self.since[iid] = now
        self.instances[iid] = instance
        self.changed[iid] = now
        self.json[iid] = _instance_json(instance, self.since[iid], now)

    def drop(self, instance: Instance, now: float) -> dict[str, Any]:
        iid = instance.instance_id
        since = self.since.pop(iid, now)
        self.instances.pop(iid, None)
        self.changed.pop(iid, None)
        self.json.pop(iid, None)
        return _instance_json(instance, since, now)


def _instance_json(instance: Instance, since: float, changed: float) -> dict[str, Any]:
    out: dict[str, Any] = instance.model_dump(mode="json")
    out["since"] = round(since, 3)
    out["changed"] = round(changed, 3)
    return out


@dataclass(frozen=True, slots=True)
class Event:
    """One thing an SSE stream sends: a change (``kind="change"``) or an operator sample."""

    kind: str  # "change" | "operator"
    data: bytes  # the JSON, serialised once for every stream
    service: str | None = None
    seq: int = 0
    revision: int = 0


class Subscriber:
    """One SSE stream's bounded queue. A stream that falls ``maxsize`` events behind is
    dropped (its queue emptied and ended): the catalog never waits for a client."""

    def __init__(self, service: str | None, maxsize: int, peer: str) -> None:
        self.service = service
        self.peer = peer
        self.dropped = False
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize)

    def offer(self, event: Event) -> None:
        if self.dropped or (self.service is not None and event.service != self.service):
            return
        if self._queue.full():
            self.dropped = True
            log.warning(
                "SSE client %s fell %d events behind; disconnecting it "
                "(gateway.stream_buffer bounds each stream)",
                self.peer,
                self._queue.maxsize,
            )
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(None)
            return
        self._queue.put_nowait(event)

    def close(self) -> None:
        """End the stream (shutdown): what it has not sent yet no longer matters."""
        if self._queue.full():
            while not self._queue.empty():
                self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def get(self, timeout: float) -> Event | None:
        """The next event; None when the stream ends; TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            return await self._queue.get()


# --- the catalog ------------------------------------------------------------------------------


class Catalog:
    def __init__(
        self,
        registry: Registry,
        settings: GatewaySettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self._clock = clock
        self.entries: dict[str, Entry] = {}
        self.changes: deque[dict[str, Any]] = deque(maxlen=settings.changes_kept)
        self.seq = 0
        self.generation = 1
        self.answers = AnswerIndex()
        self.loaded = asyncio.Event()
        self._mutated = asyncio.Event()
        self._subscribers: set[Subscriber] = set()
        self._following: dict[str, asyncio.Task[None]] = {}
        self._views: dict[str, ServiceView] = {}
        self._listing = RetryLog(log, "gateway service list")

    # --- reading ------------------------------------------------------------------------------

    def services(self) -> list[dict[str, Any]]:
        return [self.entries[name].summary() for name in sorted(self.entries)]

    def recent(self, limit: int) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        return list(self.changes)[-limit:]

    def state(self) -> dict[str, Any]:
        """What the dashboard's first ``event: state`` carries."""
        return {
            "index": self.seq,
            "services": {
                name: {
                    "epoch": e.epoch,
                    "revision": e.revision,
                    "instances": [e.json[i] for i in sorted(e.json)],
                }
                for name, e in sorted(self.entries.items())
            },
            "changes": list(self.changes),
        }

    def resume(self, service: str, revision: int) -> list[dict[str, Any]] | None:
        """The changes of ``service`` after ``revision`` (its current epoch), or None when
        they are not all still held (the caller sends a snapshot instead)."""
        entry = self.entries.get(service)
        if entry is None or revision > entry.revision or revision < 0:
            return None
        if revision == entry.revision:
            return []
        held = [
            c
            for c in self.changes
            if c["service"] == service and c["epoch"] == entry.epoch and c["revision"] > revision
        ]
        # the ring drops from its old end only: if the first held change follows directly
        # on ``revision``, every later one is held too
        if not held or held[0]["revision"] > revision + 1:
            return None
        return held

    async def wait_mutation(self, generation: int, timeout: float) -> bool:
        """Wait until the generation passes ``generation``; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                while self.generation <= generation:
                    await self._mutated.wait()
        except TimeoutError:
            return False
        return True

    # --- streams ------------------------------------------------------------------------------

    def subscribe(self, service: str | None, peer: str) -> Subscriber:
        """A new stream's queue; read the state to send first right away (no await in
        between) so nothing falls between it and the queued events."""
        if len(self._subscribers) >= self.settings.max_streams:
            raise StreamsFull(f"{self.settings.max_streams} event streams are open already")
        sub = Subscriber(service, self.settings.stream_buffer, peer)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    @property
    def streams(self) -> int:
        return len(self._subscribers)

    def close_streams(self) -> None:
        """End every open stream (shutdown: SSE clients must not hold the server open)."""
        for sub in list(self._subscribers):
            sub.close()

    def publish(self, event: Event) -> None:
        for sub in list(self._subscribers):
            sub.offer(event)

    # --- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Discover services and follow them until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    await self._discover(tg)
                    self.loaded.set()
                    self._adopt_quiet_revisions()
                    await asyncio.sleep(self.settings.refresh)  # the refresh period
        finally:
            self.close_streams()

    async def _discover(self, tg: asyncio.TaskGroup) -> None:
        try:
            rows = await self.registry.services()
        except BusregError as exc:
            self._listing.failed(exc)
            return
        self._listing.recovered()
        loads: list[asyncio.Future[None]] = []
        for row in rows:
            name = str(row["service"])
            if name in self._following:
                continue
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._following[name] = tg.create_task(self._follow(name, ready), name=f"gw-{name}")
            loads.append(ready)
        if loads:
            # the first listing (and each later one) answers once its new views are loaded
            # or failed: /healthz turns ok with every known service in the catalog
            await asyncio.wait(loads)

    async def _follow(self, service: str, ready: asyncio.Future[None]) -> None:
        """Watch one service; any failure ends this follower and the next listing starts
        another (a view that failed to load, or a bug: logged, never the whole catalog)."""
        try:
            view = await self.registry.watch(service)
            # synchronous from here to the loop: the copy and the subscription are taken at
            # the same point of the view's history
            stream = view.changes()
            try:
                self._views[service] = view
                self._add_entry(view)
                if not ready.done():
                    ready.set_result(None)
                async for change in stream:
                    self._apply(service, change, view)
            finally:
                await stream.aclose()
        except BusregError as exc:
            log.warning("cannot watch %s (will retry at the next listing): %s", service, exc)
        except Exception:
            log.exception("following %s failed; it restarts at the next listing", service)
        finally:
            if not ready.done():
                ready.set_result(None)
            self._following.pop(service, None)

    def _add_entry(self, view: ServiceView) -> None:
        now = self._clock()
        old = self.entries.get(view.service)
        entry = Entry(view.service, view.epoch, view.revision, {})
        for inst in view.instances.values():
            entry.put(inst, now)
            if old is not None and inst.instance_id in old.since:
                # a restarted follower keeps what it knew of an unchanged instance
                iid = inst.instance_id
                entry.since[iid], entry.changed[iid] = old.since[iid], old.changed[iid]
                entry.json[iid] = _instance_json(inst, entry.since[iid], entry.changed[iid])
        self.entries[view.service] = entry
        self._mutate()
        if old is None and self.loaded.is_set():
            # a service that appeared after the first listing: its instances are news to
            # the open streams (the first listing is what their first state shows)
            for iid in sorted(entry.instances):
                self._record(entry, DeltaKind.ADDED, None, entry.json[iid], now)

    def _apply(self, service: str, change: Change, view: ServiceView) -> None:
        entry = self.entries[service]
        now = self._clock()
        if change.kind is DeltaKind.REMOVED:
            instance_json = entry.drop(change.instance, now)
        else:
            entry.put(change.instance, now)
            instance_json = entry.json[change.instance.instance_id]
        entry.revision = change.revision
        entry.epoch = view.epoch
        self._mutate()
        self._record(entry, change.kind, change.reason, instance_json, now)

    def _record(
        self,
        entry: Entry,
        kind: DeltaKind,
        reason: str | None,
        instance_json: dict[str, Any],
        now: float,
    ) -> None:
        """Log one change and fan it out to the streams."""
        self.seq += 1
        record = {
            "seq": self.seq,
            "at": round(now, 3),
            "service": entry.service,
            "epoch": entry.epoch,
            "revision": entry.revision,
            "kind": kind.value,
            "reason": reason,
            "instance": instance_json,
        }
        self.changes.append(record)
        self.publish(Event("change", orjson.dumps(record), entry.service, self.seq, entry.revision))

    def _adopt_quiet_revisions(self) -> None:
        # A resync that found the same instances (an epoch change, a gap whose deltas
        # cancelled out) moves the view's revision without a change to consume: adopt it
        # when the entry holds exactly the view's instances.
        for name, view in self._views.items():
            entry = self.entries.get(name)
            if entry is None or (entry.epoch, entry.revision) == (view.epoch, view.revision):
                continue
            if entry.instances == view.state.instances:
                entry.epoch, entry.revision = view.epoch, view.revision
                self._mutate()

    def _mutate(self) -> None:
        self.generation += 1
        self._mutated.set()
        # waiters woken by the set above re-check the generation; new ones wait anew
        self._mutated = asyncio.Event()
