"""Register a FastStream app's instance for as long as the app runs.

    from faststream import FastStream
    from faststream.rabbit import RabbitBroker
    from busreg import Settings
    from busreg.integrations.faststream_app import register_app

    settings = Settings()
    broker = RabbitBroker(settings.amqp_urls()[0])
    app = FastStream(broker)
    instance = register_app(app, settings, "inventory", address="10.0.0.7:8080", zone="eu-1a")

The instance registers in the app's ``after_startup`` hook, that is once the broker is
connected and its subscribers consume (announce only what can serve), heartbeats in the
background while the app runs, and deregisters in ``on_shutdown``, before the broker
stops, so callers stop choosing it while in-flight messages still drain (the broker's
``graceful_timeout``). A registration failure fails the app's start-up.

``instance.registry`` (a ``busreg.Registry``) is usable by the app's own code while it runs:
``await instance.registry.watch("pricing")``, ``consume_group``, or an httpx client from
``http_client.async_client``; ``warm_up=["pricing"]`` loads those views before the app is
announced. Without FastStream, the same object works as an async context manager::

    async with AppInstance(settings, "inventory", address="10.0.0.7:8080") as instance:
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Self

from busreg.client.checks import HealthCheck
from busreg.client.registration import Registration
from busreg.client.registry import Registry
from busreg.errors import ClosedError
from busreg.settings import Settings
from busreg.wire.models import InstanceStatus

if TYPE_CHECKING:
    from faststream import FastStream

__all__ = ["AppInstance", "register_app"]

log = logging.getLogger("busreg.lifespan")


class AppInstance:
    """One registered instance of an app, owned by a background task.

    The registry lives in a task of its own (not in FastStream's start-up or shutdown
    task, which differ), started by ``start()`` and ended by ``stop()``.
    """

    def __init__(
        self,
        settings: Settings,
        service: str,
        *,
        address: str,
        instance_id: str | None = None,
        zone: str = "default",
        metadata: dict[str, str] | None = None,
        status: InstanceStatus | str = InstanceStatus.UP,
        warm_up: Sequence[str] = (),
        check: HealthCheck | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.address = address
        self.instance_id = instance_id
        self.zone = zone
        self.metadata = dict(metadata or {})
        self.status = InstanceStatus(status)
        self.warm_up = list(warm_up)
        self.check = check
        self._registry: Registry | None = None
        self._registration: Registration | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def registry(self) -> Registry:
        """The app's registry client (while the app runs)."""
        if self._registry is None:
            raise ClosedError(f"{self.service} instance is not running")
        return self._registry

    @property
    def registration(self) -> Registration:
        """The registered instance (while the app runs)."""
        if self._registration is None:
            raise ClosedError(f"{self.service} instance is not running")
        return self._registration

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Open a registry, register (confirmed by the broker) and start heartbeating."""
        if self._task is not None:
            raise ClosedError("an AppInstance starts once; create a new one")
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._task = asyncio.create_task(self._run(ready), name=f"busreg-app-{self.service}")
        try:
            await asyncio.shield(ready)
        except BaseException:
            self._stop.set()
            with contextlib.suppress(Exception):  # its error is the one being raised
                await self._task
            raise

    async def _run(self, ready: asyncio.Future[None]) -> None:
        try:
            async with Registry(self.settings, name=f"app {self.service}") as registry:
                self._registry = registry
                if self.warm_up:
                    await registry.warm_up(*self.warm_up)
                self._registration = await registry.register(
                    self.service,
                    address=self.address,
                    instance_id=self.instance_id,
                    zone=self.zone,
                    metadata=self.metadata,
                    status=self.status,
                    check=self.check,
                )
                log.info(
                    "app instance registered service=%s instance=%s",
                    self.service,
                    self._registration.instance_id,
                )
                ready.set_result(None)
                await self._stop.wait()
                # leaving the registry deregisters (confirmed) and stops the heartbeats
        except asyncio.CancelledError:
            if not ready.done():
                ready.cancel()
            raise
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
                return
            raise
        finally:
            self._registry = None

    async def set_status(self, status: InstanceStatus | str) -> None:
        """Change the announced status (e.g. OUT_OF_SERVICE to drain before a deploy)."""
        self.status = InstanceStatus(status)
        await self.registration.update(status=self.status)

    async def stop(self) -> None:
        """Deregister (confirmed) and close the registry; idempotent. A failure is logged,
        not raised: the app's shutdown goes on (the instance then expires after its TTL)."""
        if self._task is None:
            return
        self._stop.set()
        try:
            await self._task
        except Exception as exc:
            log.error("app instance of %s did not close cleanly: %r", self.service, exc)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def install(self, app: FastStream) -> Self:
        """Hook into ``app``: register after start-up, deregister at shutdown."""

        async def busreg_register() -> None:
            await self.start()

        async def busreg_deregister() -> None:
            await self.stop()

        app.after_startup(busreg_register)
        app.on_shutdown(busreg_deregister)
        return self


def register_app(
    app: FastStream,
    settings: Settings,
    service: str,
    *,
    address: str,
    instance_id: str | None = None,
    zone: str = "default",
    metadata: dict[str, str] | None = None,
    status: InstanceStatus | str = InstanceStatus.UP,
    warm_up: Sequence[str] = (),
    check: HealthCheck | None = None,
) -> AppInstance:
    """Register ``app`` as an instance of ``service`` while it runs (see the module doc);
    ``check``: a health check (busreg.client.checks), STARTING until it passes."""
    return AppInstance(
        settings,
        service,
        address=address,
        instance_id=instance_id,
        zone=zone,
        metadata=metadata,
        status=status,
        warm_up=warm_up,
        check=check,
    ).install(app)
