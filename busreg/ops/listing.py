"""``busreg ls`` and ``busreg watch``: what a namespace holds, as tables and change lines.

busreg ls                      # SERVICE  INSTANCES  REVISION
busreg ls inventory [--json]   # one service's instances (with operator overrides)
busreg watch inventory         # the snapshot, then one line per change
"""

from __future__ import annotations

import asyncio
import difflib
import json
import sys
import time
from collections.abc import Awaitable, Callable

import orjson

from busreg.client.registry import Registry
from busreg.client.revisions import Change
from busreg.ops.overrides import override_note
from busreg.settings import Settings
from busreg.tasks import cancel_until_done
from busreg.wire.models import DeltaKind

__all__ = ["change_line", "list_services", "table", "watch_service"]


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


async def list_services(settings: Settings, service: str | None, *, as_json: bool) -> int:
    async with Registry(settings, name="busreg-ls") as registry:
        if service is None:
            services = await registry.services()
            if as_json:
                print(json.dumps({"services": services}))
            else:
                rows = [[s["service"], str(s["instances"]), str(s["revision"])] for s in services]
                print(table(rows, ["SERVICE", "INSTANCES", "REVISION"]))
            return 0
        snap = await registry.snapshot(service)
        if snap.revision == 0:
            await _hint_unknown(registry, service)
        if as_json:
            print(
                json.dumps(
                    {
                        "service": snap.service,
                        "revision": snap.revision,
                        "epoch": snap.epoch,
                        "instances": [
                            i.model_dump(mode="json", exclude_none=True) for i in snap.instances
                        ],
                    }
                )
            )
            return 0
        print(f"{snap.service}  revision {snap.revision}  ({len(snap.instances)} instances)")
        rows = [
            [
                i.instance_id,
                i.address,
                i.zone,
                i.status.value,
                ",".join(f"{k}={v}" for k, v in sorted(i.metadata.items())),
                override_note(i),
            ]
            for i in snap.instances
        ]
        header = ["INSTANCE", "ADDRESS", "ZONE", "STATUS", "METADATA", "OVERRIDE"]
        if not any(i.override for i in snap.instances):  # the column only when used
            header, rows = header[:-1], [r[:-1] for r in rows]
        print(table(rows, header))
    return 0


async def _hint_unknown(registry: Registry, service: str) -> None:
    """A service that never had an instance is empty (revision 0), not an error; but a
    typo deserves a hint, on stderr so the output stays what it says."""
    known = [s["service"] for s in await registry.services()]
    near = difflib.get_close_matches(service, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(near)}?" if near else "`busreg ls` lists the services"
    print(f"busreg: {service!r} has never had an instance (revision 0); {hint}", file=sys.stderr)


def change_line(change: Change, as_json: bool, reason: str | None = None) -> str:
    if as_json:
        return orjson.dumps(
            {
                "kind": change.kind.value,
                "service": change.service,
                "revision": change.revision,
                "instance_id": change.instance_id,
                "reason": reason or change.reason,
                "instance": change.instance.model_dump(mode="json", exclude_none=True),
            }
        ).decode()
    i = change.instance
    why = f" ({reason or change.reason})" if (reason or change.reason) else ""
    note = f" [{override_note(i)}]" if i.override else ""
    return (
        f"{time.strftime('%H:%M:%S')} rev {change.revision:<5} {change.kind.value:<8} "
        f"{i.instance_id} {i.address} zone={i.zone} {i.status.value}{note}{why}"
    )


async def watch_service(
    settings: Settings,
    service: str,
    *,
    as_json: bool,
    duration: float | None,
    until: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]],
    stop: asyncio.Event,
) -> int:
    """Print the snapshot, then every change until ``stop`` is set or ``duration`` passes;
    ``until(run)`` runs ``run`` with the command's signal handling (SIGTERM sets ``stop``)."""
    async with Registry(settings, name=f"busreg-watch {service}") as registry:
        view = await registry.watch(service)
        if view.revision == 0:
            await _hint_unknown(registry, service)
        changes = view.changes()
        for inst in sorted(view.instances.values(), key=lambda i: i.instance_id):
            change = Change(DeltaKind.ADDED, service, view.revision, inst, None)
            print(change_line(change, as_json, reason="snapshot"), flush=True)

        async def follow() -> None:
            async for change in changes:
                print(change_line(change, as_json), flush=True)

        async def run() -> None:
            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(follow())
                try:
                    async with asyncio.timeout(duration):
                        await stop.wait()
                except TimeoutError:
                    pass
                await cancel_until_done([task])

        await until(run)
    return 0
