"""The stream producer every registrant and worker uses (transport/producer.py): a send to a
stream it has not written to yet must not wait for rstream's locator close (a fixed 0.2 s
sleep), and the locator it keeps for a while is closed afterwards and on close()."""

from __future__ import annotations

import asyncio

import pytest
from rstream import RawMessage

from busreg import Settings
from busreg import constants as c
from busreg.transport import producer as producer_module
from busreg.transport.connections import stream_producer
from busreg.transport.producer import QuickProducer

from .helpers import eventually

pytestmark = [pytest.mark.servers, pytest.mark.busreg(partitions=2)]


async def test_the_locator_closes_off_the_send_path_and_after_its_linger(
    busreg_namespace: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = busreg_namespace
    monkeypatch.setattr(producer_module, "LOCATOR_LINGER", 0.3)
    producer = await stream_producer(settings, "quick-producer-test")
    assert isinstance(producer, QuickProducer)
    try:
        await producer.send_wait(c.ingest_partition(settings.namespace, 0), RawMessage(b"{}"))
        # the send came back with the locator still open: closing it (0.2 s) was not awaited
        locator = producer._default_client
        assert locator is not None
        assert locator.is_connection_alive()
        # a second stream within the linger asks the same locator
        await producer.send_wait(c.ingest_partition(settings.namespace, 1), RawMessage(b"{}"))
        assert producer._default_client is locator
        # then, unused, it is closed; the data connections stay
        await eventually(
            lambda: _value(producer._default_client),
            lambda client: client is None,
            timeout=5,
            what="the unused locator closed",
        )
        assert not locator.is_connection_alive()
        await producer.send_wait(c.ingest_partition(settings.namespace, 0), RawMessage(b"{}"))
    finally:
        await producer.close()


async def test_close_ends_a_pending_linger(busreg_namespace: Settings) -> None:
    producer = await stream_producer(busreg_namespace, "quick-producer-close")
    await producer.send_wait(c.ingest_partition(busreg_namespace.namespace, 0), RawMessage(b"{}"))
    linger = producer._linger
    assert linger is not None
    assert not linger.done()
    await producer.close()
    assert linger.done()
    assert producer._linger is None


async def _value(value: object) -> object:
    await asyncio.sleep(0)
    return value
