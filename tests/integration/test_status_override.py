"""Operator status overrides on real servers (issue 15 §2, Eureka's overriddenStatus).

``busreg set-status`` drains an instance: subscribers get a ``modified`` delta with the
effective status and who set it and why; the instance's heartbeats and re-registrations
keep the override; ``--clear`` ends it; a typo in the instance id is refused, not reported
as done. With auth enforced, only the service's key, an owner, or the operators' admin key
may set one, and the worker records whom it verified.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable

import pytest

from busreg import Instance, InstanceStatus, Registry, Settings, Worker
from busreg.settings import AuthSettings, ClientSettings
from busreg.testing import running_worker
from busreg.wire.auth import admin_key, service_key

from .helpers import eventually, settings_env

pytestmark = pytest.mark.servers

OOS = InstanceStatus.OUT_OF_SERVICE
SVC = "payments"


def _busreg(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "busreg", *args],
        env=settings_env(settings, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _overridden(iid: str, status: InstanceStatus | None) -> Callable[[dict[str, Instance]], bool]:
    def check(instances: dict[str, Instance]) -> bool:
        inst = instances.get(iid)
        if inst is None:
            return False
        if status is None:
            return inst.override is None
        return inst.override is not None and inst.override.status is status

    return check


async def test_set_status_drains_an_instance_until_cleared(
    busreg_worker: Worker, busreg_registry: Registry, busreg_namespace: Settings
) -> None:
    settings = busreg_namespace
    reg = await busreg_registry.register(
        SVC, address="127.0.0.1:9001", instance_id="pay-1", ttl=2.0, interval=0.2
    )
    await busreg_registry.register(SVC, address="127.0.0.1:9002", instance_id="pay-2")
    view = await busreg_registry.watch(SVC)
    await view.wait_for(lambda i: {"pay-1", "pay-2"} <= set(i), timeout=10)
    changes = view.changes()

    # off the loop: the worker answering the CLI runs on it
    out = await asyncio.to_thread(
        _busreg,
        settings,
        "set-status",
        SVC,
        "pay-1",
        "OUT_OF_SERVICE",
        "--reason",
        "drain before deploy",
        "--by",
        "alice",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        f"{SVC}/pay-1: OUT_OF_SERVICE (override OUT_OF_SERVICE by alice: drain before deploy)"
    )
    change = await asyncio.wait_for(anext(changes), 10)
    assert (change.kind.value, change.instance_id, change.instance.status) == (
        "modified",
        "pay-1",
        OOS,
    )
    o = change.instance.override
    assert o is not None
    assert (o.by, o.reason, o.identity) == ("alice", "drain before deploy", None)
    assert view.instances["pay-2"].override is None

    # heartbeats (0.2 s apart) and a re-registration of the same incarnation keep it
    seq = reg.seq

    async def sent() -> int:
        return reg.seq

    # the heartbeats go into the stream before the update, so the update's delta proves
    # the worker applied them first
    await eventually(sent, lambda n: n >= seq + 5, timeout=10, what="5 more heartbeats")
    await reg.update(metadata={"version": "2"})
    await view.wait_for(lambda i: i["pay-1"].metadata.get("version") == "2", timeout=10)
    assert view.instances["pay-1"].status is OOS
    snap = await busreg_registry.snapshot(SVC)
    assert next(i for i in snap.instances if i.instance_id == "pay-1").status is OOS

    ls = await asyncio.to_thread(_busreg, settings, "ls", SVC)
    assert ls.returncode == 0, ls.stderr
    assert "OVERRIDE" in ls.stdout
    assert "override OUT_OF_SERVICE by alice: drain before deploy" in ls.stdout

    # a typo is refused with the near name, and changes nothing
    typo = await asyncio.to_thread(_busreg, settings, "set-status", SVC, "pay-3", "DOWN")
    assert typo.returncode == 1
    assert typo.stderr.strip().startswith(f"busreg: error: {SVC} has no instance 'pay-3'")
    assert "did you mean pay-1, pay-2?" in typo.stderr or "did you mean pay-2, pay-1?" in (
        typo.stderr
    )
    usage = await asyncio.to_thread(_busreg, settings, "set-status", SVC, "pay-1")
    assert usage.returncode == 1
    assert "give a STATUS (OUT_OF_SERVICE, DOWN, UP) or --clear" in usage.stderr

    cleared = await asyncio.to_thread(_busreg, settings, "set-status", SVC, "pay-1", "--clear")
    assert cleared.returncode == 0, cleared.stderr
    assert cleared.stdout.strip() == f"{SVC}/pay-1: override cleared; status UP"
    await view.wait_for(_overridden("pay-1", None), timeout=10)
    assert view.instances["pay-1"].status is InstanceStatus.UP


async def test_a_restart_ends_an_override(
    busreg_worker: Worker, busreg_namespace: Settings
) -> None:
    """An override belongs to the incarnation it was set on: the drained instance's
    replacement (same id, new process) comes up UP, as a deploy expects."""
    async with Registry(busreg_namespace) as ops:
        view = await ops.watch(SVC)
        async with Registry(busreg_namespace) as old:
            await old.register(SVC, address="127.0.0.1:9001", instance_id="pay-1")
            await view.wait_for(lambda i: "pay-1" in i, timeout=10)
            await ops.set_status(SVC, "pay-1", OOS, reason="deploy", by="ci")
            await view.wait_for(_overridden("pay-1", OOS), timeout=10)
        await view.wait_for(lambda i: "pay-1" not in i, timeout=10)  # deregistered
        async with Registry(busreg_namespace) as new:
            await new.register(SVC, address="127.0.0.1:9001", instance_id="pay-1")
            instances = await view.wait_for(lambda i: "pay-1" in i, timeout=10)
            assert instances["pay-1"].status is InstanceStatus.UP
            assert instances["pay-1"].override is None


SECRET = "override-test-secret"


async def test_with_auth_only_owners_and_the_admin_key_may_override(
    busreg_namespace: Settings,
) -> None:
    """Another service's key is refused (dead-lettered, the CLI says it was not applied);
    the admin key and the service's own key are accepted, and the identity the worker
    verified is shown with the override."""
    enforced = busreg_namespace.model_copy(
        update={"auth": AuthSettings(mode="enforce", secret=SECRET)}
    )

    def client(keys: str) -> Settings:
        return busreg_namespace.model_copy(update={"client": ClientSettings(signing_keys=keys)})

    def key(service: str) -> str:
        return service_key(SECRET.encode(), service).hex()

    admin = f"~admin={admin_key(SECRET.encode()).hex()}"
    async with running_worker(enforced), Registry(client(f"{SVC}={key(SVC)}")) as owner:
        await owner.register(SVC, address="127.0.0.1:9001", instance_id="pay-1")
        view = await owner.watch(SVC)
        await view.wait_for(lambda i: "pay-1" in i, timeout=10)

        stranger = await asyncio.to_thread(
            _busreg,
            busreg_namespace,
            "set-status",
            SVC,
            "pay-1",
            "DOWN",
            "--wait",
            "2",
            BUSREG_CLIENT__SIGNING_KEYS=f"billing={key('billing')}",
        )
        assert stranger.returncode == 1
        assert "was published but not applied within 2s" in stranger.stderr
        assert view.instances["pay-1"].override is None

        by_admin = await asyncio.to_thread(
            _busreg,
            busreg_namespace,
            "set-status",
            SVC,
            "pay-1",
            "OUT_OF_SERVICE",
            "--by",
            "oncall",
            BUSREG_CLIENT__SIGNING_KEYS=admin,
        )
        assert by_admin.returncode == 0, by_admin.stderr
        assert "by oncall (admin-key)" in by_admin.stdout
        await owner.set_status(SVC, "pay-1", "DOWN", by="payments-team")
        inst = (await view.wait_for(_overridden("pay-1", InstanceStatus.DOWN), 10))["pay-1"]
        assert inst.override is not None
        assert inst.override.identity == f"key:{SVC}"
