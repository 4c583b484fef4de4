"""Invariant 7 on real servers: `billing` cannot act for `inventory` over either protocol,
and RabbitMQ itself refuses a forged user_id."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest
import pytest_asyncio

from busreg import AuthenticationFailed, PublishFailed, Registry, Settings, partition_for
from busreg import constants as c
from busreg.client.registration import IngestPublisher
from busreg.ops.deadletters import read_dead_letters
from busreg.server.worker import Worker
from busreg.settings import AuthSettings, ClientSettings
from busreg.testing import running_worker
from busreg.transport.connections import connect_amqp
from busreg.transport.streams import StreamWriter
from busreg.transport.topology import service_user_permissions
from busreg.wire.auth import service_key, sign
from busreg.wire.codec import encode_event
from busreg.wire.models import Deregister, Heartbeat, Register

from .helpers import partition_states

pytestmark = pytest.mark.servers

SECRET = "test-secret-of-the-workers"


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def broker_users(busreg_settings: Settings) -> Iterator[dict[str, str]]:
    """Two per-service users whose only right is to publish to the ingest exchange."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is needed to create per-service users")
    suffix = uuid.uuid4().hex[:6]
    users = {"inventory": f"inventory-{suffix}", "billing": f"billing-{suffix}"}
    for service, user in users.items():
        _ctl("add_user", user, "pw")
        # exactly what brokers/ ships for each service (busreg.transport.topology)
        conf, write, read = service_user_permissions(busreg_settings.namespace, service)
        _ctl("set_permissions", "-p", "/", user, conf, write, read)
    try:
        yield users
    finally:
        for user in users.values():
            subprocess.run(["rabbitmqctl", "delete_user", user], capture_output=True, timeout=60)


@pytest.fixture
def auth_settings(busreg_settings: Settings, broker_users: dict[str, str]) -> Settings:
    return busreg_settings.model_copy(
        update={
            "auth": AuthSettings(
                mode="enforce",
                secret=SECRET,  # type: ignore[arg-type]
                owners={user: [service] for service, user in broker_users.items()},
                accept_unsigned_amqp=True,
            )
        }
    )


@pytest_asyncio.fixture
async def auth_worker(auth_settings: Settings, busreg_namespace: Settings) -> AsyncIterator[Worker]:
    async with running_worker(auth_settings) as worker:
        yield worker


def _client(settings: Settings, keys: str | None) -> Settings:
    """A registrant's settings: no workers' secret, just the given signing keys."""
    return settings.model_copy(
        update={
            "auth": AuthSettings(),
            "client": ClientSettings(
                heartbeat_interval=0.5,
                ttl=2.0,
                signing_keys=keys,  # type: ignore[arg-type]
            ),
        }
    )


def _key(service: str) -> str:
    return service_key(SECRET.encode(), service).hex()


async def _amqp_publish(
    settings: Settings, user: str, body: bytes, service: str, user_id: str
) -> None:
    url = settings.amqp_url.replace("guest:guest", f"{user}:pw")
    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(
            c.ingest_super_stream(settings.namespace), ensure=False
        )
        await exchange.publish(
            aio_pika.Message(body, user_id=user_id),
            routing_key=str(partition_for(service, settings.partitions)),
        )
    finally:
        await conn.close()


async def test_billing_cannot_act_for_inventory_over_either_protocol(
    auth_worker: Worker, auth_settings: Settings, broker_users: dict[str, str]
) -> None:
    settings = auth_settings
    inventory = _client(settings, f"inventory={_key('inventory')}")
    async with Registry(inventory) as inv, Registry(_client(settings, None)) as watcher:
        view = await watcher.watch("inventory", resync_interval=None)
        reg = await inv.register("inventory", address="10.0.0.1:80", instance_id="inv-1")
        await view.wait_for(lambda i: "inv-1" in i, timeout=10)
        seq = reg.seq + 10

        def forged(kind: str) -> bytes:
            common = {
                "service": "inventory",
                "instance_id": "inv-1",
                "incarnation": reg.incarnation,
                "seq": seq,
            }
            if kind == "deregister":
                return encode_event(Deregister(**common))
            cls = Register if kind == "register" else Heartbeat
            return encode_event(cls(**common, address="6.6.6.6:80"))

        # stream protocol: unsigned, and signed with billing's own key
        writer = StreamWriter(_client(settings, None), "billing-stream")
        stream = IngestPublisher(writer, settings).stream_for("inventory")
        attempts = 0
        try:
            for kind in ("register", "heartbeat", "deregister"):
                await writer.send(stream, forged(kind), timeout=5)
                billing_key = service_key(SECRET.encode(), "billing")
                await writer.send(stream, sign(billing_key, forged(kind)), timeout=5)
                attempts += 2
        finally:
            await writer.close()
        # AMQP: billing's broker user, with its true user_id
        for kind in ("register", "heartbeat", "deregister"):
            await _amqp_publish(
                settings,
                broker_users["billing"],
                forged(kind),
                "inventory",
                broker_users["billing"],
            )
            attempts += 1
        # inventory's own broker user may act for inventory over AMQP (owner mapping)
        ok = encode_event(
            Register(
                service="inventory",
                instance_id="inv-amqp",
                incarnation=1,
                seq=1,
                address="10.0.0.2:80",
            )
        )
        await _amqp_publish(
            settings, broker_users["inventory"], ok, "inventory", broker_users["inventory"]
        )
        await view.wait_for(lambda i: "inv-amqp" in i, timeout=10)
        # nothing forged landed: inv-1 is untouched
        assert view.instances["inv-1"].address == "10.0.0.1:80"
        k = partition_for("inventory", settings.partitions)
        state = (await partition_states(settings))[k]
        assert int(state["outbox"]) == 0
        total, letters = await read_dead_letters(settings, limit=100, ack=True)
        assert total == attempts
        assert {x["reason"] for x in letters} == {"unauthorised"}
        print(
            f"refused {attempts} forged events: "
            f"{sorted({x['detail'].split(' (')[0] for x in letters})}"
        )


async def test_broker_refuses_a_forged_user_id(
    busreg_namespace: Settings, broker_users: dict[str, str]
) -> None:
    with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed, match="user_id"):
        async with asyncio.timeout(10):
            await _amqp_publish(
                busreg_namespace,
                broker_users["billing"],
                b"{}",
                "inventory",
                user_id=broker_users["inventory"],
            )


async def test_a_least_privilege_service_user_can_do_its_job_and_no_more(
    auth_worker: Worker, auth_settings: Settings, broker_users: dict[str, str]
) -> None:
    """inventory's broker user registers over AMQP (identity = user_id), watches, reads
    snapshots and consumes its own group; it can neither write the streams directly nor
    touch another service's group."""
    settings = auth_settings
    user = broker_users["inventory"]
    mine = _client(settings, None).model_copy(
        update={"amqp_url": settings.amqp_url.replace("guest:guest", f"{user}:pw")}
    )
    mine.client.ingest_protocol = "amqp"
    async with Registry(mine, name="inventory-app") as app:
        view = await app.watch("inventory", resync_interval=None)
        await app.register("inventory", address="10.9.9.9:80", instance_id="least")
        await view.wait_for(lambda i: "least" in i, timeout=10)
        assert [i.instance_id for i in (await app.snapshot("inventory")).instances] == ["least"]
        async with app.consume_group("inventory", "inventory-audit") as _messages:
            pass  # its own group: declared and consumed without a permission error
    # the stream protocol is closed to it: it could forge an AMQP user_id there
    writer = StreamWriter(mine.model_copy(update={"client": ClientSettings()}), "sneaky")
    try:
        with pytest.raises(PublishFailed):
            await writer.send(c.ingest_partition(settings.namespace, 0), b"{}", timeout=3)
    finally:
        await writer.close()
    # and another service's group is not its own
    try:
        async with Registry(mine, name="inventory-app") as app:
            with pytest.raises(AuthenticationFailed):
                async with app.consume_group("billing", "billing-ledger") as _messages:
                    pass
    finally:
        # what the namespace cleanup cannot find: it knows services from Redis, not groups
        conn = await connect_amqp(settings, "auth-cleanup")
        try:
            channel = await conn.channel()
            await channel.queue_delete(
                c.group_queue(settings.namespace, "inventory", "inventory-audit")
            )
            # billing never registered, so the namespace cleanup does not know its exchange
            await channel.exchange_delete(c.service_exchange(settings.namespace, "billing"))
        finally:
            await conn.close()
