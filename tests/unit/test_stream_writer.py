"""``StreamWriter`` replaces a connection whose publisher for one stream stopped confirming,
even while sends to other streams are confirmed (found on the 3-node cluster: after a
stream leader moved, one stream's heartbeats timed out for good while the others went
through, and every instance of that partition expired)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from busreg import Settings
from busreg.errors import PublishFailed
from busreg.transport import streams
from busreg.transport.streams import SILENT_LIMIT, StreamWriter


class FakeProducer:
    """Confirms every send, except to the streams in ``silent`` (never confirmed)."""

    made = 0

    def __init__(self, silent: set[str]) -> None:
        FakeProducer.made += 1
        self.silent = silent
        self.closed = False

    async def _get_or_create_publisher(self, stream: str) -> None:
        return None

    async def send_wait(self, stream: str, message: Any, timeout: float) -> None:
        if stream in self.silent:
            await asyncio.Event().wait()  # never confirmed

    async def close(self) -> None:
        self.closed = True


async def test_a_silent_stream_replaces_the_connection_despite_other_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FakeProducer.made = 0

    async def fake_producer(
        settings: Settings, name: str, timeout: float = 10.0, on_close: Any = None
    ) -> Any:
        return FakeProducer({"quiet"})

    monkeypatch.setattr(streams, "stream_producer", fake_producer)
    writer = StreamWriter(Settings(), "test")
    try:
        for _ in range(SILENT_LIMIT):
            with pytest.raises(PublishFailed):
                await writer.send("quiet", b"x", timeout=0.05)
            await writer.send("busy", b"x", timeout=0.05)  # confirmed in between
        await writer.send("busy", b"x", timeout=0.05)
        assert FakeProducer.made == 2, "the silent stream's connection was never replaced"
    finally:
        await writer.close()


async def test_the_writer_tells_which_streams_it_lost_its_way_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A silent stream and a connection rstream reports closed are both reported to
    ``on_disrupted`` (the worker writes outage marks there); confirmed sends are not."""
    closers: list[Any] = []

    async def fake_producer(
        settings: Settings, name: str, timeout: float = 10.0, on_close: Any = None
    ) -> Any:
        closers.append(on_close)
        return FakeProducer({"quiet"})

    class Info:
        reason = "Metadata Update"
        streams = ["moved"]

    monkeypatch.setattr(streams, "stream_producer", fake_producer)
    told: list[list[str]] = []
    writer = StreamWriter(Settings(), "test", on_disrupted=told.append)
    try:
        await writer.send("busy", b"x", timeout=0.05)
        assert told == []
        with pytest.raises(PublishFailed):
            await writer.send("quiet", b"x", timeout=0.05)
        assert told == [["quiet"]]
        await writer.send("busy", b"x", timeout=0.05)  # on a new connection
        await closers[-1](Info())
        assert told == [["quiet"], ["moved"]]
    finally:
        await writer.close()


async def test_peek_heads_raises_one_error_not_a_group() -> None:
    """``busreg status`` on a namespace whose streams are gone printed an ExceptionGroup
    traceback; the caller gets the first busreg error, which says what to run."""
    from busreg.errors import TopologyMissing

    class Missing:
        async def subscribe(self, stream: str, *args: Any, **kwargs: Any) -> None:
            raise TopologyMissing(f"peek {stream}: stream missing (run `busreg topology apply`)")

    with pytest.raises(TopologyMissing, match="run `busreg topology apply`"):
        await streams.peek_heads(Missing(), Settings(namespace="gone", partitions=3))
