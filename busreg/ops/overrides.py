"""``busreg set-status``: an operator overrides an instance's status, and sees it applied.

    busreg set-status inventory inv-1 OUT_OF_SERVICE --reason "drain before deploy"
    busreg set-status inventory inv-1 --clear

The command checks that the instance exists (a typo must not look like success), publishes
the override (``Registry.set_status``), then waits until its own view of the service shows
it: a worker applied it, and every subscriber got the same ``modified`` delta. Without a
worker, or with the event refused (auth: see ``busreg deadletters``), it says so and exits 1.
"""

from __future__ import annotations

import difflib

from busreg.client.registry import Registry, default_operator
from busreg.errors import ConfigurationError, RequestTimeout
from busreg.settings import Settings
from busreg.wire.models import Instance, InstanceStatus

__all__ = ["override_note", "set_status"]


def override_note(inst: Instance) -> str:
    """``"override OUT_OF_SERVICE by alice (user:ops): drain"``, or "" without one."""
    o = inst.override
    if o is None:
        return ""
    who = f"{o.by} ({o.identity})" if o.identity else o.by
    why = f": {o.reason}" if o.reason else ""
    return f"override {o.status.value} by {who}{why}"


def _outcome(service: str, inst: Instance | None, instance_id: str, cleared: bool) -> str:
    if inst is None:
        return f"{service}/{instance_id}: removed meanwhile (an override ends with the instance)"
    if cleared:
        return f"{service}/{instance_id}: override cleared; status {inst.status.value}"
    assert inst.override is not None
    line = f"{service}/{instance_id}: {inst.status.value} ({override_note(inst)})"
    if inst.status is not inst.override.status:
        # Eureka's rule: an instance's own DOWN or STARTING wins over an operator override
        line += f"; its own {inst.status.value} wins until it is UP again"
    return line


async def set_status(
    settings: Settings,
    service: str,
    instance_id: str,
    status: InstanceStatus | None,
    *,
    reason: str,
    by: str | None,
    wait: float,
) -> str:
    """Apply an override (``status=None`` clears it); the line to print once applied."""
    by = by or default_operator()
    async with Registry(settings, name="busreg-set-status") as registry:
        view = await registry.watch(service, resync_interval=None)
        if instance_id not in view.instances:
            names = sorted(view.instances)
            near = difflib.get_close_matches(instance_id, names, n=3, cutoff=0.6)
            hint = (
                f"did you mean {', '.join(near)}?"
                if near
                else (f"its instances: {', '.join(names[:5])}" if names else "it has none")
            )
            raise ConfigurationError(
                f"{service} has no instance {instance_id!r} (revision {view.revision}); {hint}"
            )
        await registry.set_status(service, instance_id, status, reason=reason, by=by)

        def applied(instances: dict[str, Instance]) -> bool:
            inst = instances.get(instance_id)
            if inst is None:
                return True
            o = inst.override
            if status is None:
                return o is None
            return o is not None and (o.status, o.by, o.reason) == (status, by, reason)

        try:
            instances = await view.wait_for(applied, wait)
        except TimeoutError:
            raise RequestTimeout(
                f"the override of {service}/{instance_id} was published but not applied "
                f"within {wait:g}s: is a worker running? (a refused one is in "
                "`busreg deadletters`)"
            ) from None
        return _outcome(service, instances.get(instance_id), instance_id, status is None)
