"""Writing events into the ingest super stream, and a registered instance's lifecycle.

Events go over the RabbitMQ stream protocol (rstream) to partition ``<ns>.ingest-<k>`` with
``k = partition_for(service, P)``; ``publish`` returns once the broker confirmed the event
(invariant 1). A ``Registration`` heartbeats in the background and deregisters when closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from typing import TypeVar
from urllib.parse import unquote, urlsplit

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from pydantic import BaseModel, ValidationError

from busreg import constants as c
from busreg.backoff import Backoff, RetryLog, retrying
from busreg.client.checks import CHECK_METADATA_KEY, CheckGate, CheckResult, HealthCheck
from busreg.client.renewals import BeatGrid, HeartbeatBatcher
from busreg.errors import BusregError, ConfigurationError, PublishFailed
from busreg.settings import Settings
from busreg.tasks import close_quietly
from busreg.transport.connections import connect_amqp, translate
from busreg.transport.streams import StreamWriter
from busreg.transport.topology import verify_partitions
from busreg.wire.auth import ADMIN, service_key, sign
from busreg.wire.codec import encode_event
from busreg.wire.models import (
    Address,
    Deregister,
    Heartbeat,
    InstanceStatus,
    LeaseTiming,
    Register,
    ServiceName,
    SetStatus,
    Zone,
    validation_message,
)
from busreg.wire.routing import partition_for

__all__ = ["AmqpWriter", "IngestPublisher", "Registration", "checked_registration"]

#: One confirmed-publish attempt of a registration or deregistration; a confirm takes about
#: a millisecond, so a second without one means the connection is not usable.
ATTEMPT_TIMEOUT = 1.0

#: Pauses between confirmed-publish attempts of one event (within its deadline).
PUBLISH_BACKOFF = Backoff(first=0.05, cap=1.0)

log = logging.getLogger("busreg.client")
R = TypeVar("R", Register, Heartbeat)


class AmqpWriter:
    """Confirmed sends into the ingest partitions over AMQP 0-9-1 instead.

    For registrants whose broker user may not write streams directly (least-privilege
    per-service users, see ``busreg.transport.topology.service_user_permissions``): events go to the
    super stream exchange with routing key ``"<k>"`` and the connection's user as
    ``user_id``, which RabbitMQ validates, so workers know who sent them. About 40 times
    slower than the stream protocol on our machines; plenty for heartbeats of one app.
    """

    def __init__(self, settings: Settings, name: str) -> None:
        self._settings = settings
        self._name = name
        self._user = unquote(urlsplit(settings.amqp_urls()[0]).username or "guest")
        self._exchange = c.ingest_super_stream(settings.namespace)
        self._conn: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def _ready(self) -> AbstractChannel:
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                if self._conn is None:
                    self._conn = await connect_amqp(self._settings, self._name)
                with translate("open ingest channel"):
                    self._channel = await self._conn.channel(publisher_confirms=True)
            return self._channel

    async def send(self, stream: str, body: bytes, timeout: float) -> None:
        partition = stream.rsplit("-", 1)[1]
        try:
            async with asyncio.timeout(timeout):
                channel = await self._ready()
                with translate(f"publish to {self._exchange}"):
                    exchange = await channel.get_exchange(self._exchange, ensure=False)
                    await exchange.publish(
                        aio_pika.Message(
                            body,
                            user_id=self._user,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            content_type="application/json",
                        ),
                        routing_key=partition,
                    )
        except TimeoutError as exc:
            raise PublishFailed(f"no confirm from {self._exchange} within {timeout}s") from exc
        except BusregError as exc:
            if isinstance(exc, PublishFailed):
                raise
            raise PublishFailed(str(exc)) from exc

    async def check_partitions(self) -> None:
        """``verify_partitions`` on this writer's own connection."""
        await self._ready()
        assert self._conn is not None
        await verify_partitions(self._conn, self._settings)

    async def close(self) -> None:
        if self._conn is not None:
            await close_quietly(self._conn.close, "ingest AMQP connection")


class IngestPublisher:
    """Confirmed publishing of ingest events to their partition streams."""

    def __init__(self, writer: StreamWriter | AmqpWriter, settings: Settings) -> None:
        self._writer = writer
        self._settings = settings
        self._keys = settings.client.keys()
        secret = settings.auth.secret_bytes()
        self._secret = secret  # development convenience: a client that has the secret
        #: heartbeats of this process's registrations go out together (renewals.py)
        self.grid = BeatGrid()
        self.batcher = HeartbeatBatcher(writer) if settings.client.batch_heartbeats else None

    def _key(self, service: str, *, admin: bool = False) -> bytes | None:
        key = self._keys.get(service) or self._keys.get("*")
        if key is None and self._secret is not None:
            key = self._keys[service] = service_key(self._secret, service)
        if key is None and admin:  # an operator's override: the admin key signs for any
            key = self._keys.get(ADMIN)
        return key

    def stream_for(self, service: str) -> str:
        k = partition_for(service, self._settings.partitions)
        return c.ingest_partition(self._settings.namespace, k)

    async def publish(
        self, event: Register | Heartbeat | Deregister | SetStatus, timeout: float
    ) -> None:
        """Publish once; raise PublishFailed unless the broker confirmed within ``timeout``."""
        body = encode_event(event)
        key = self._key(event.service, admin=isinstance(event, SetStatus))
        if key is not None:
            body = sign(key, body)
        await self._writer.send(self.stream_for(event.service), body, timeout)

    async def heartbeat(self, event: Heartbeat, timeout: float) -> None:
        """Publish a heartbeat, in a batch with others of this process falling due at the
        same moment (unless batching is off); raise PublishFailed unless confirmed."""
        if self.batcher is None:
            await self.publish(event, timeout)
            return
        body = encode_event(event)
        key = self._key(event.service)
        if key is not None:
            body = sign(key, body)
        await self.batcher.send(self.stream_for(event.service), body, timeout)

    async def publish_until_confirmed(
        self, event: Register | Heartbeat | Deregister | SetStatus, deadline: float
    ) -> None:
        """Retry ``publish`` (same event: a duplicate is harmless) until confirmed or the
        deadline passes; the last failure is raised."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        kind = f"{type(event).__name__.lower()} of {event.service}/{event.instance_id}"
        errors: list[PublishFailed] = []

        async def attempt() -> None:
            # short attempts: a connection that came back half-ready (stream not yet
            # available) is dropped and replaced instead of waited on until the deadline
            remaining = end - loop.time()
            try:
                await self.publish(event, timeout=max(0.2, min(ATTEMPT_TIMEOUT, remaining)))
            except PublishFailed as exc:
                errors.append(exc)
                raise

        try:
            await retrying(
                attempt,
                what=f"publish {kind}",
                log=log,
                backoff=PUBLISH_BACKOFF,
                retry_on=(PublishFailed,),
                deadline=deadline,
                # bounded, and its end is raised to the caller: no warning of its own
                level=logging.DEBUG,
            )
        except PublishFailed as exc:
            # the last attempt is often a short timeout; what stood in the way is the last
            # failure that was not one (a refused connection, a missing stream)
            cause = next((e for e in reversed(errors) if not _timed_out(e)), exc)
            raise PublishFailed(f"{kind} not confirmed within {deadline:g}s: {cause}") from exc


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc.__cause__, TimeoutError)


def checked_registration(
    settings: Settings,
    service: str,
    *,
    address: str,
    instance_id: str | None,
    zone: str,
    status: InstanceStatus | str,
    metadata: dict[str, str] | None,
    ttl: float | None,
    interval: float | None,
) -> tuple[str, float, float]:
    """``(instance id, ttl, interval)`` of a registration, or ConfigurationError with one
    line saying what is wrong: the same checks for ``Registry.register`` and ``busreg
    register``, made before anything connects. The fields a default instance id is built
    from (the address) are checked first, so a bad address is not reported as a bad id."""
    cfg = settings.client
    ttl = cfg.ttl if ttl is None else ttl
    interval = cfg.heartbeat_interval if interval is None else interval
    try:
        _Where(service=service, address=address, zone=zone)
        LeaseTiming(ttl=ttl, interval=interval)
        if instance_id is None:
            # letters the id may not hold (IPv6 brackets) become '_'
            raw = f"{socket.gethostname()}-{os.getpid()}-{address}"
            instance_id = re.sub(r"[^A-Za-z0-9_.:@-]", "_", raw)[:128]
        Register(
            service=service,
            instance_id=instance_id,
            incarnation=0,
            seq=0,
            address=address,
            zone=zone,
            status=InstanceStatus(status),
            metadata=metadata or {},
            ttl=ttl,
        )
    except ValidationError as exc:
        raise ConfigurationError(f"invalid registration: {validation_message(exc)}") from exc
    except ValueError as exc:  # the status
        raise ConfigurationError(f"invalid registration: {exc}") from exc
    return instance_id, ttl, interval


class _Where(BaseModel):
    """The fields a default instance id is built from, checked on their own first."""

    service: ServiceName
    address: Address
    zone: Zone


class Registration:
    """A registered instance. Heartbeats until ``deregister()`` (or its Registry closes).

    Attributes mirror the event fields; ``incarnation`` is fixed for this run (it orders
    this run after any earlier run of the same instance id), ``seq`` grows per event.
    """

    def __init__(
        self,
        publisher: IngestPublisher,
        *,
        service: str,
        instance_id: str,
        address: str,
        zone: str,
        status: InstanceStatus,
        metadata: dict[str, str],
        ttl: float,
        interval: float,
        confirm_timeout: float,
    ) -> None:
        self._publisher = publisher
        self.service = service
        self.instance_id = instance_id
        self.address = address
        self.zone = zone
        #: the status the instance asked for; ``status`` is what is published: the health
        #: check's verdict while this is UP (see checks.py), else this
        self.requested_status = status
        self.status = status
        self.metadata = dict(metadata)
        #: the health check's verdict (None: no check)
        self.check_status: InstanceStatus | None = None
        self.ttl = ttl
        self.interval = interval
        self.incarnation = time.time_ns()
        self.seq = 0
        self.heartbeats_sent = 0
        self.heartbeats_failed = 0
        self._beat_failures = RetryLog(log, f"heartbeat of {service}/{instance_id}")
        self._confirm_timeout = confirm_timeout
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # events of one registration are sent one at a time so seq order is publish order
        self._lock = asyncio.Lock()

    def _event(self, kind: type[R]) -> R:
        self.seq += 1
        return kind(
            service=self.service,
            instance_id=self.instance_id,
            incarnation=self.incarnation,
            seq=self.seq,
            address=self.address,
            zone=self.zone,
            status=self.status,
            metadata=self.metadata,
            ttl=self.ttl,
        )

    async def _register(self) -> None:
        async with self._lock:
            event = self._event(Register)
            await self._publisher.publish_until_confirmed(event, self._confirm_timeout)

    async def update(
        self, *, status: InstanceStatus | None = None, metadata: dict[str, str] | None = None
    ) -> None:
        """Change status and/or metadata; returns once the broker confirmed the change."""
        if status is not None:
            self.requested_status = InstanceStatus(status)
        if metadata is not None:
            reason = self.metadata.get(CHECK_METADATA_KEY)
            self.metadata = dict(metadata)
            if reason is not None:
                self.metadata[CHECK_METADATA_KEY] = reason
        self._resolve_status()
        await self._register()

    def _resolve_status(self) -> None:
        up = self.requested_status is InstanceStatus.UP
        self.status = self.check_status if up and self.check_status else self.requested_status

    def start_checking(self) -> None:
        """Before the first registration: STARTING until a check passes."""
        self.check_status = InstanceStatus.STARTING
        self.metadata[CHECK_METADATA_KEY] = "starting: no check has passed yet"
        self._resolve_status()

    async def check_loop(self, check: HealthCheck) -> None:
        """Probe ``check`` now and every ``check.interval`` until deregistered; publish each
        status change at once (a failed publish is carried by the next heartbeat, which
        holds the whole registration)."""
        gate = CheckGate(
            check.failures, check.successes, self.check_status or InstanceStatus.STARTING
        )
        loop = asyncio.get_running_loop()
        while not self._done.is_set():
            started = loop.time()
            try:
                # the probes bound themselves; this bounds a probe that does not
                async with asyncio.timeout(check.timeout + 1.0):
                    result = await check.probe()
            except TimeoutError:
                result = CheckResult(False, f"timeout after {check.timeout}s")
            change = gate.observe(result)
            if change is not None and not self._done.is_set():
                status, reason = change
                log.info("%s/%s %s: %s", self.service, self.instance_id, status.value, reason)
                self.check_status = status
                self.metadata[CHECK_METADATA_KEY] = reason
                self._resolve_status()
                try:
                    await self._register()
                except PublishFailed as exc:
                    log.warning(
                        "%s/%s: status %s not confirmed (%s); the next heartbeat carries it",
                        self.service,
                        self.instance_id,
                        status.value,
                        exc,
                    )
            # a periodic timer, not synchronisation: the next check, or deregistration
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, started + check.interval - loop.time())):
                    await self._done.wait()

    async def heartbeat_loop(self) -> None:
        """Heartbeat every ``interval`` until deregistered. A failed beat is tried again a
        quarter interval later, not a whole one: a broker node failing over takes a second
        or two, and a beat that lands within the TTL keeps the instance (measured on the
        3-node cluster: one instance expired with three beats missed at 1 s, TTL 3 s).
        A streak of failures is logged once. Every heartbeat carries the whole
        registration, so one that gets through after an outage re-registers the instance
        if the worker forgot it."""
        loop = asyncio.get_running_loop()
        grid = self._publisher.grid  # this process's registrations beat together
        next_at = grid.next_after(loop.time(), self.interval)
        while not self._done.is_set():
            try:
                async with asyncio.timeout(max(0.0, next_at - loop.time())):
                    await self._done.wait()
                return
            except TimeoutError:
                pass
            # the next grid point (after a stall too: no burst to catch up)
            next_at = grid.next_after(loop.time(), self.interval)
            try:
                async with self._lock:
                    if self._done.is_set():
                        return
                    await self._publisher.heartbeat(
                        self._event(Heartbeat), timeout=min(self.interval, self.ttl / 2)
                    )
                self.heartbeats_sent += 1
                self._beat_failures.recovered()
            except PublishFailed as exc:
                self.heartbeats_failed += 1
                self._beat_failures.failed(exc)
                next_at = min(next_at, loop.time() + self.interval / 4)

    async def deregister(self) -> None:
        """Stop heartbeating and remove the instance now (confirmed by the broker)."""
        if self._done.is_set():
            return
        self._done.set()
        async with self._lock:
            self.seq += 1
            event = Deregister(
                service=self.service,
                instance_id=self.instance_id,
                incarnation=self.incarnation,
                seq=self.seq,
            )
            await self._publisher.publish_until_confirmed(event, self._confirm_timeout)
        if self._task is not None and self._task is not asyncio.current_task():
            await self._task

    @property
    def active(self) -> bool:
        """True while the instance heartbeats (until deregistered or abandoned)."""
        return not self._done.is_set()

    def abandon(self) -> None:
        """Stop heartbeating without deregistering (the instance will expire after TTL)."""
        self._done.set()
