"""The registry client: register instances, read snapshots, watch services.

    async with Registry(Settings()) as registry:
        reg = await registry.register("inventory", address="10.0.0.7:8080", zone="eu-1a")
        view = await registry.watch("inventory")
        print(view.instances)

``register`` returns once the broker confirmed the registration; the instance then
heartbeats in the background and is deregistered when the registry closes. Views stay
current by themselves (snapshot + deltas, re-read on any gap).

Background work (heartbeats, views) runs in tasks this object owns and supervises: an
unexpected error in one is logged and that loop restarted, never propagated to the
application's task or to the other loops (a TaskGroup would cancel both).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Self

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from pydantic import TypeAdapter, ValidationError

from busreg.backoff import Backoff, retrying
from busreg.client.checks import HealthCheck
from busreg.client.groups import GroupMessage, consume_group
from busreg.client.registration import (
    PUBLISH_BACKOFF,
    AmqpWriter,
    IngestPublisher,
    Registration,
    checked_registration,
)
from busreg.client.rpc import RpcClient
from busreg.client.view import ServiceView
from busreg.errors import ClosedError, ConfigurationError, ConnectionFailed
from busreg.settings import Settings
from busreg.tasks import cancel_until_done, close_quietly
from busreg.transport.connections import connect_amqp, translate
from busreg.transport.streams import StreamWriter
from busreg.transport.topology import verify_partitions
from busreg.wire.models import (
    InstanceStatus,
    ServiceName,
    SetStatus,
    Snapshot,
    validation_message,
)

__all__ = ["Registry"]

log = logging.getLogger("busreg.client")

#: Pauses before restarting a background loop that failed unexpectedly (a bug): short,
#: since its view or heartbeats are stale meanwhile, and growing so a loop that fails at
#: once every time cannot spin or flood the log.
RESTART_BACKOFF = Backoff(first=0.1, cap=2.0)
#: A loop that ran this long before failing starts its back-off afresh.
RESTART_QUIET = 10.0


class Registry:
    """Client of a busreg namespace; an async context manager that cannot be reopened."""

    def __init__(self, settings: Settings | None = None, *, name: str = "busreg-client") -> None:
        self.settings = settings or Settings()
        self._name = name
        self._state = "new"
        self._stack = contextlib.AsyncExitStack()
        self._amqp: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._rpc: RpcClient | None = None
        self._writer: StreamWriter | AmqpWriter | None = None
        self._publisher: IngestPublisher | None = None
        self._producer_lock = asyncio.Lock()
        self._amqp_lock = asyncio.Lock()
        self._registrations: list[Registration] = []
        self._views: dict[str, ServiceView] = {}
        # views being loaded: concurrent watch() calls of a service wait for the same one
        self._starting: dict[str, asyncio.Task[ServiceView]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise ClosedError("a Registry can be opened once; create a new one")
        self._state = "open"
        # nothing connects yet: a registrant opens its stream connection on its first
        # register(), a reader its AMQP connection on its first read (_broker)
        self._stack.push_async_callback(self._shutdown)
        return self

    async def _broker(self) -> tuple[AbstractRobustConnection, RpcClient]:
        """The AMQP side (connection, channel, snapshot client), opened on first need: a
        registrant that never reads needs none (one TCP connection less per instance;
        a broker's file descriptors are what ~1,000 independent clients ran out of)."""
        async with self._amqp_lock:
            self._check_open()
            if self._amqp is None or self._rpc is None:
                amqp = await connect_amqp(self.settings, self._name)
                try:
                    await verify_partitions(amqp, self.settings)
                    with translate("open channel"):
                        channel = await amqp.channel()
                    rpc = RpcClient(channel, self.settings.namespace)
                    await rpc.start()
                except BaseException:
                    await close_quietly(amqp.close, "registry AMQP connection")
                    raise
                amqp.reconnect_callbacks.add(lambda *_: rpc.reconnected())
                self._amqp, self._channel, self._rpc = amqp, channel, rpc
            return self._amqp, self._rpc

    async def __aexit__(self, *exc: object) -> None:
        self._state = "closed"
        await self._stack.aclose()

    async def _shutdown(self) -> None:
        # views still loading close what they opened; then deregister (confirmed), stop
        # the views, and end whatever background task is left
        await cancel_until_done(list(self._starting.values()))
        results = await asyncio.gather(
            *(r.deregister() for r in self._registrations), return_exceptions=True
        )
        for reg, res in zip(self._registrations, results, strict=True):
            if isinstance(res, BaseException):
                log.warning("deregister of %s/%s failed: %s", reg.service, reg.instance_id, res)
        for view in self._views.values():
            await view.close()
        await cancel_until_done(list(self._tasks))
        if self._writer is not None:
            await self._writer.close()
        if self._amqp is not None:
            await close_quietly(self._amqp.close, "registry AMQP connection")

    @property
    def registrations(self) -> tuple[Registration, ...]:
        """Instances registered through this registry (read-only view)."""
        return tuple(self._registrations)

    @property
    def views(self) -> dict[str, ServiceView]:
        """Live views by service (read-only copy)."""
        return dict(self._views)

    def _spawn(self, coro: Coroutine[object, object, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _supervise(
        self,
        what: str,
        run: Callable[[], Awaitable[None]],
        *,
        alive: Callable[[], bool],
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        """Run ``run()`` until it returns; an unexpected error is logged with its traceback
        and ``run`` restarted (after ``on_restart()``) while ``alive()``. Cancellation (the
        registry closing) ends it; nothing else leaves this task."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while alive():
            began = loop.time()
            try:
                await run()
                return
            except Exception:
                attempt = 0 if loop.time() - began > RESTART_QUIET else attempt + 1
                log.exception("%s failed unexpectedly; restarting it", what)
            # back-off between restarts, not synchronisation
            await asyncio.sleep(RESTART_BACKOFF.delay(attempt - 1))
            if on_restart is not None and alive():
                on_restart()

    def _check_open(self) -> None:
        if self._state != "open":
            raise ClosedError("use `async with Registry(...)` (and not after it closed)")

    async def _ingest(self) -> IngestPublisher:
        async with self._producer_lock:
            if self._publisher is None:
                if self.settings.client.ingest_protocol == "amqp":
                    writer: StreamWriter | AmqpWriter = AmqpWriter(self.settings, self._name)
                else:
                    writer = StreamWriter(self.settings, self._name)
                try:
                    # P must agree with the namespace's, or events would go to the wrong
                    # partition (checked over the writer's own protocol: no AMQP needed);
                    # a broker restarting now is waited for as a registration would be
                    await retrying(
                        writer.check_partitions,
                        what="topology check",
                        log=log,
                        backoff=PUBLISH_BACKOFF,
                        retry_on=(ConnectionFailed,),
                        deadline=self.settings.client.confirm_timeout,
                        level=logging.DEBUG,
                    )
                except BaseException:
                    await writer.close()
                    raise
                self._writer = writer
                self._publisher = IngestPublisher(writer, self.settings)
            return self._publisher

    # --- registrants --------------------------------------------------------------------------

    async def register(
        self,
        service: str,
        *,
        address: str,
        instance_id: str | None = None,
        zone: str = "default",
        status: InstanceStatus | str = InstanceStatus.UP,
        metadata: dict[str, str] | None = None,
        ttl: float | None = None,
        interval: float | None = None,
        check: HealthCheck | None = None,
    ) -> Registration:
        """Register an instance; returns once the broker confirmed it, then heartbeats.

        With a ``check`` (``HttpCheck``, ``TcpCheck``, ``CommandCheck``) the instance is
        STARTING until the check first passes, and DOWN while it fails (busreg.client.checks)."""
        self._check_open()
        instance_id, ttl, interval = checked_registration(
            self.settings,
            service,
            address=address,
            instance_id=instance_id,
            zone=zone,
            status=status,
            metadata=metadata,
            ttl=ttl,
            interval=interval,
        )
        cfg = self.settings.client
        publisher = await self._ingest()
        reg = Registration(
            publisher,
            service=service,
            instance_id=instance_id,
            address=address,
            zone=zone,
            status=InstanceStatus(status),
            metadata=metadata or {},
            ttl=ttl,
            interval=interval,
            confirm_timeout=cfg.confirm_timeout,
        )
        if check is not None:
            reg.start_checking()
        await reg._register()
        if check is not None:
            self._spawn(
                self._supervise(
                    f"health check of {service}/{instance_id}",
                    lambda: reg.check_loop(check),
                    alive=lambda: reg.active,
                ),
                name=f"check-{instance_id}",
            )
        reg._task = self._spawn(
            self._supervise(
                f"heartbeats of {service}/{instance_id}",
                reg.heartbeat_loop,
                alive=lambda: reg.active,
            ),
            name=f"heartbeat-{instance_id}",
        )
        self._registrations.append(reg)
        log.info("registered service=%s instance=%s address=%s", service, instance_id, address)
        return reg

    async def set_status(
        self,
        service: str,
        instance_id: str,
        status: InstanceStatus | str | None,
        *,
        reason: str = "",
        by: str | None = None,
    ) -> None:
        """Override an instance's status as an operator (``None`` clears the override);
        returns once the broker confirmed the event. Any instance of the namespace, not
        only this registry's own: this is how a team drains an instance before a deploy.

            await registry.set_status("inventory", "inv-1", "OUT_OF_SERVICE",
                                      reason="drain before deploy")

        The override holds until cleared, for the instance's current incarnation (its
        heartbeats and re-registrations keep it; a restart ends it); the instance's own
        DOWN or STARTING still wins. Subscribers see the effective ``status`` and
        ``Instance.override`` (who, why, when). With auth enforced, sign with the service's
        key or the operators' admin key (``busreg keys --admin``), or publish over AMQP as
        an owner of the service. An override of an unknown instance changes nothing."""
        self._check_open()
        try:
            event = SetStatus(
                service=service,
                instance_id=instance_id,
                status=None if status is None else InstanceStatus(status).value,
                by=by or default_operator(),
                reason=reason,
            )
        except ValueError as exc:
            message = validation_message(exc) if isinstance(exc, ValidationError) else str(exc)
            raise ConfigurationError(f"set-status of {service}/{instance_id}: {message}") from exc
        publisher = await self._ingest()
        await publisher.publish_until_confirmed(event, self.settings.client.confirm_timeout)
        log.info(
            "status override service=%s instance=%s status=%s by=%s",
            service,
            instance_id,
            event.status or "(cleared)",
            event.by,
        )

    # --- readers ------------------------------------------------------------------------------

    async def snapshot(self, service: str) -> Snapshot:
        """The service's instances and revision, read from the workers over AMQP."""
        self._check_open()
        _check_service(service)
        _, rpc = await self._broker()
        return await rpc.snapshot(service, self.settings.client.request_timeout)

    async def services(self) -> list[dict[str, Any]]:
        """Every known service: ``{"service", "revision", "instances", "epoch"}`` rows."""
        self._check_open()
        _, rpc = await self._broker()
        return await rpc.services(self.settings.client.request_timeout)

    async def watch(self, service: str, *, resync_interval: float | None = 30.0) -> ServiceView:
        """A live view of ``service`` (shared per registry; loaded before it returns).

        Concurrent first calls for one service share one load and get the same view; if
        the load fails (no worker answers: RequestTimeout) each of them gets the error,
        nothing stays open, and a later call tries again."""
        self._check_open()
        _check_service(service)
        view = self._views.get(service)
        if view is not None:
            return view
        starting = self._starting.get(service)
        if starting is None:
            starting = asyncio.create_task(
                self._start_view(service, resync_interval), name=f"watch-load-{service}"
            )
            self._starting[service] = starting
            starting.add_done_callback(functools.partial(self._loaded, service))
        try:
            # shielded: a caller that gives up does not take the load from the others
            return await asyncio.shield(starting)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if starting.cancelled() and (task is None or not task.cancelling()):
                raise ClosedError("the registry closed while the view was loading") from None
            raise

    def _loaded(self, service: str, task: asyncio.Task[ServiceView]) -> None:
        if self._starting.get(service) is task:
            del self._starting[service]
        if not task.cancelled():
            task.exception()  # retrieved here too: its callers may all have given up

    async def _start_view(self, service: str, resync_interval: float | None) -> ServiceView:
        amqp, rpc = await self._broker()
        view = ServiceView(
            service,
            amqp,
            rpc,
            self.settings.namespace,
            request_timeout=self.settings.client.request_timeout,
            queue_max=self.settings.client.watch_queue_max,
            resync_interval=resync_interval,
        )
        try:
            await view.start()
            if self._state != "open":
                raise ClosedError("the registry closed while the view was loading")
        except BaseException:
            # a view without its first snapshot has nothing to check deltas against: close
            # the channel and queue it opened instead of leaving them to the connection
            await view.close()
            raise
        self._views[service] = view
        self._spawn(
            self._supervise(
                f"watch of {service}",
                view.run,
                alive=lambda: not view.closed,
                on_restart=view.request_resync,
            ),
            name=f"watch-{service}",
        )
        return view

    def consume_group(
        self, service: str, group: str, *, prefetch: int = 16
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[GroupMessage]]:
        """Consume ``service``'s deltas as a member of consumer group ``group``: each delta
        goes to one member of the group, which must ``ack()`` it (see busreg.client.groups)."""
        self._check_open()
        _check_service(service)
        _check_service(group)
        return self._group(service, group, prefetch)

    @contextlib.asynccontextmanager
    async def _group(
        self, service: str, group: str, prefetch: int
    ) -> AsyncIterator[AsyncIterator[GroupMessage]]:
        amqp, _ = await self._broker()
        with translate("open group channel"):
            channel = await amqp.channel()
        try:
            async with consume_group(
                channel, self.settings.namespace, service, group, prefetch=prefetch
            ) as messages:
                yield messages
        finally:
            if not channel.is_closed:
                await close_quietly(channel.close, "group channel")

    async def warm_up(self, *services: str) -> None:
        """Load the views of ``services`` now (eager loading: the first call does not wait)."""
        await asyncio.gather(*(self.watch(s) for s in services))


_service_name: TypeAdapter[str] = TypeAdapter(ServiceName)


def default_operator() -> str:
    """Who an override says set it when not told: ``user@host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:128]


def _check_service(name: str) -> None:
    """Service (and group) names are validated before they become broker names."""
    try:
        _service_name.validate_python(name)
    except ValidationError as exc:
        raise ConfigurationError(f"invalid service name {name!r}: {_first_error(exc)}") from exc


def _first_error(exc: Exception) -> str:
    return validation_message(exc) if isinstance(exc, ValidationError) else str(exc)
