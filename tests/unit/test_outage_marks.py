"""Outage marks (server/ticker.py): a worker that loses its way to a partition stream writes
a Tick with ``outage=True`` into it, and the owner opens the outage grace there.

Found on the 3-node cluster: in a rolling restart, heartbeats to a stream whose leader moved
stayed out for 2.5-3.5 s while the workers' ticks got in and moved the clock, and 22-82
healthy instances expired in 3 of 7 runs (invariant 4). Here: the encoding of a mark (and
who may write one when auth is enforced), and that ``OutageMarks`` writes one mark per
disruption, retried until confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from busreg import Settings
from busreg.errors import PublishFailed
from busreg.server.encoding import BatchEncoder
from busreg.server.stats import PartitionStats
from busreg.server.ticker import OutageMarks
from busreg.settings import AuthSettings, WorkerSettings
from busreg.wire.auth import service_key, sign, worker_key
from busreg.wire.codec import encode_event
from busreg.wire.models import Tick

SECRET = "s3cret"
MARK = encode_event(Tick(worker="w1", outage=True))


def _ops(settings: Settings, body: bytes) -> tuple[str, str]:
    """(op, dead letter) of one message as the encoder hands it to apply.lua."""
    args = BatchEncoder(settings, 0, PartitionStats()).encode([(7, 1_000, body)])
    return args[2], args[7]


def test_a_mark_is_op_g_and_a_plain_tick_op_n() -> None:
    settings = Settings()
    assert _ops(settings, MARK) == ("G", "")
    assert _ops(settings, encode_event(Tick(worker="w1"))) == ("N", "")


@pytest.mark.parametrize(
    ("body", "op", "refused"),
    [
        (sign(worker_key(SECRET.encode()), MARK), "G", False),
        (MARK, "N", True),  # unsigned: anyone could hold every expiry back with these
        (sign(service_key(SECRET.encode(), "inventory"), MARK), "N", True),  # a service key
        (encode_event(Tick(worker="w1")), "N", False),  # a plain tick needs no signature
    ],
)
def test_with_auth_enforced_only_workers_may_mark(body: bytes, op: str, refused: bool) -> None:
    settings = Settings(auth=AuthSettings(mode="enforce", secret=SECRET))
    got_op, dead = _ops(settings, body)
    assert got_op == op
    if refused:  # dead-lettered: the tick still moves the clock, but opens no grace
        assert "unauthorised" in dead
        assert "outage mark" in dead
    else:
        assert dead == ""


class FakeWriter:
    """Records sends; fails those to the streams in ``failing``."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.failing: set[str] = set()
        self.sent_event = asyncio.Event()

    async def send(self, stream: str, body: bytes, timeout: float) -> None:
        if stream in self.failing:
            raise PublishFailed(f"no confirm from {stream}")
        self.sent.append((stream, body))
        self.sent_event.set()


@contextlib.asynccontextmanager
async def running(marks: OutageMarks) -> AsyncIterator[None]:
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(marks.run(stop))
        try:
            yield
        finally:
            stop.set()


async def _sent(writer: FakeWriter, n: int) -> None:
    """Wait until ``writer`` has confirmed ``n`` sends."""
    async with asyncio.timeout(2):
        while len(writer.sent) < n:
            await writer.sent_event.wait()
            writer.sent_event.clear()


async def test_one_mark_per_disruption_retried_until_confirmed() -> None:
    settings = Settings(worker=WorkerSettings(standby_tick_interval=0.05, outage_grace=10.0))
    writer = FakeWriter()
    marks = OutageMarks(settings, writer, "w1")  # type: ignore[arg-type]
    async with running(marks):
        writer.failing = {"ns.ingest-1"}
        # one leader move: a closed connection, a silent send and a metadata update
        marks.note(["ns.ingest-0", "ns.ingest-1"])
        marks.note(["ns.ingest-0"])
        await _sent(writer, 1)
        assert writer.sent == [("ns.ingest-0", MARK)]
        writer.failing = set()  # ingest-1's new leader is up: its mark gets in now
        await _sent(writer, 2)
    assert [s for s, _ in writer.sent] == ["ns.ingest-0", "ns.ingest-1"]
    assert marks.written == 2
    marks.note(["ns.ingest-0", "ns.ingest-1"])  # the same move, heard once more
    assert marks._pending == {}  # coalesced: nothing to write


async def test_marks_are_signed_when_the_worker_has_the_secret() -> None:
    settings = Settings(
        auth=AuthSettings(mode="enforce", secret=SECRET),
        worker=WorkerSettings(standby_tick_interval=0.05),
    )
    writer = FakeWriter()
    marks = OutageMarks(settings, writer, "w1")  # type: ignore[arg-type]
    async with running(marks):
        marks.note(["ns.ingest-3"])
        await _sent(writer, 1)
    assert writer.sent == [("ns.ingest-3", sign(worker_key(SECRET.encode()), MARK))]
    assert _ops(settings, writer.sent[0][1]) == ("G", "")
