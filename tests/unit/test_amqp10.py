"""busreg.wire.amqp10: the bounds check that keeps hostile AMQP 1.0 bodies away from rstream's
decoder (which allocates and loops by declared counts)."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rstream import AMQPMessage
from rstream._pyamqp.message import Properties

from busreg.errors import InvalidEvent
from busreg.wire.amqp10 import MAX_DEPTH, MalformedAmqp, check_message
from busreg.wire.codec import decode_ingest


def _data(body: bytes) -> bytes:
    return b"\x00\x53\x75\xb0" + struct.pack(">I", len(body)) + body


def test_messages_rstream_writes_pass() -> None:
    check_message(bytes(AMQPMessage(body=b'{"v":1}')))
    check_message(
        bytes(
            AMQPMessage(
                body=b"x" * 300,
                properties=Properties(user_id=b"cart", message_id="m-1", subject="s"),
                application_properties={"k": "v", "n": 7, "l": [1, "a", None], "b": True},
            )
        )
    )


@pytest.mark.parametrize(
    ("body", "why"),
    [
        # list32 declaring 2.6 billion elements in 8 bytes: rstream would allocate 20 GB
        (b"\x00\x53\x75\xd0\x00\x00\x00\x08\x9a\xd7\xba\xbc" + b"\x40" * 4, "declares"),
        # array32 of 2 billion nulls (zero-width elements): rstream would loop for ever
        (b"\x00\x53\x77\xf0\x00\x00\x00\x05\x7f\xff\xff\xff\x40", "declares"),
        (b"\x00\x53\x75\xb0\x00\x00\x10\x00abc", "overruns"),  # binary longer than message
        (b"\x00\x53\x75\xc0\x09\x01\x40", "overruns"),  # list8 bigger than the message
        (b"\x00\x53\x75\x81\x00\x00", "truncated"),  # long cut short
        (b"\x00\x53\x75\x99", "unknown type"),
        (b"\x00\x53\x75", "truncated"),  # descriptor without a value
        (b"\x00\x53\x7f\x40", "no message section"),  # not a section descriptor
        (_data(b"{}") + b"\x00\x53", "no message section"),  # trailing half section
        (b"", "empty"),
    ],
)
def test_hostile_or_broken_encodings_are_refused(body: bytes, why: str) -> None:
    with pytest.raises(MalformedAmqp, match=why):
        check_message(body)


def test_nesting_is_bounded() -> None:
    inner = b"\x45"  # list0
    for _ in range(MAX_DEPTH + 2):
        inner = b"\xc0" + bytes([len(inner) + 1, 1]) + inner if len(inner) < 250 else inner
    deep = b"\x00\x53\x77" + inner
    with pytest.raises(MalformedAmqp, match="nested deeper"):
        check_message(deep)


def test_decode_ingest_refuses_a_count_bomb_quickly() -> None:
    bomb = b"\x00\x53\x75\xd0\x00\x00\x00\x08\x9a\xd7\xba\xbc" + b"\x40" * 4
    started = time.perf_counter()
    with pytest.raises(InvalidEvent) as info:
        decode_ingest(bomb)
    # generous: unguarded, this takes tens of seconds and 20 GB (the guard: microseconds)
    assert time.perf_counter() - started < 1.0
    assert info.value.reason == "malformed"
    assert "declares" in str(info.value)


@given(st.binary(max_size=64))
def test_any_bytes_after_a_section_header_only_raise_invalid_event(tail: bytes) -> None:
    # hypothesis' per-example deadline (200 ms) also catches a decoder that runs away
    with pytest.raises(InvalidEvent):
        decode_ingest(b"\x00\x53\x75" + tail)
