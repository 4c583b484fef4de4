"""An inventory service instance as a FastStream app, registered with busreg.

While it runs, the app

* is registered as an instance of ``inventory`` (after the broker connected), heartbeats,
  and deregisters when it stops (``busreg.integrations.faststream_app.register_app``);
* is a member of consumer group ``inventory-audit`` on the ``inventory`` service's
  deltas (``integrations.faststream.group_subscriber``): each membership change of the service
  is audited by exactly one running instance, acknowledged after its audit line is on
  disk. A delta whose instance carries metadata ``audit=reject`` makes the handler raise,
  to show bounded redelivery and dead-lettering (to ``<namespace>.deadletter``).

Run it (settings from ``BUSREG_*`` variables, e.g. ``BUSREG_NAMESPACE``)::

    busreg topology apply && busreg worker &          # once per namespace
    INVENTORY_ADDRESS=127.0.0.1:8081 python examples/inventory_app.py
    # or: faststream run examples.inventory_app:create_app --factory

Variables: ``INVENTORY_ADDRESS`` (host:port this instance serves on, default
127.0.0.1:8080), ``INVENTORY_INSTANCE_ID`` (default host-pid-address), ``INVENTORY_ZONE``,
``INVENTORY_AUDIT_LOG`` (file the audit lines are appended to; default: stdout).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from faststream import FastStream
from faststream.rabbit import RabbitBroker

from busreg import Delta, Settings
from busreg.integrations.faststream import group_subscriber
from busreg.integrations.faststream_app import AppInstance, register_app

SERVICE = "inventory"
GROUP = "inventory-audit"


class AuditRejected(Exception):
    """The demo's poison: deltas of instances registered with metadata audit=reject."""


class AuditLog:
    """Append-only JSON lines; each line is flushed and fsynced before the delta is acked."""

    def __init__(self, path: str | None, instance: str) -> None:
        self.path = Path(path) if path else None
        self.instance = instance

    def write(self, **record: object) -> None:
        line = json.dumps({"member": self.instance, "at": time.time(), **record})
        if self.path is None:
            print(line, flush=True)
            return
        with self.path.open("a", encoding="utf-8") as out:
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())


def create_app(
    settings: Settings | None = None,
    *,
    address: str | None = None,
    instance_id: str | None = None,
    zone: str | None = None,
    audit_log: str | None = None,
) -> FastStream:
    """Build the app; arguments default to the ``INVENTORY_*`` variables."""
    settings = settings or Settings()
    address = address or os.environ.get("INVENTORY_ADDRESS", "127.0.0.1:8080")
    instance_id = instance_id or os.environ.get("INVENTORY_INSTANCE_ID") or None
    zone = zone or os.environ.get("INVENTORY_ZONE", "default")
    audit = AuditLog(audit_log or os.environ.get("INVENTORY_AUDIT_LOG"), instance_id or address)

    broker = RabbitBroker(settings.amqp_url, graceful_timeout=5.0)
    app = FastStream(broker)

    @group_subscriber(broker, settings, SERVICE, GROUP, prefetch=8)
    async def audit_change(delta: Delta) -> None:
        record = {
            "revision": delta.revision,
            "epoch": delta.epoch,
            "kind": delta.kind.value,
            "instance_id": delta.instance.instance_id,
        }
        if delta.instance.metadata.get("audit") == "reject":
            audit.write(outcome="rejected", **record)
            raise AuditRejected(f"instance {delta.instance.instance_id} refuses auditing")
        audit.write(outcome="audited", **record)

    instance = register_app(
        app, settings, SERVICE, address=address, instance_id=instance_id, zone=zone
    )
    app.context.set_global("busreg_instance", instance)
    return app


def busreg_instance(app: FastStream) -> AppInstance:
    """The app's registered instance (``.registry``, ``.registration``) while it runs."""
    instance: AppInstance = app.context.get("busreg_instance")
    return instance


async def main() -> None:
    await create_app().run()


if __name__ == "__main__":
    asyncio.run(main())
