"""The worker's memo of validated heartbeats: a hit only for the same heartbeat with
another seq, never for anything the full validation would see differently."""

from __future__ import annotations

import doctest

import orjson
import pytest

from busreg.server import memo as memo_module
from busreg.server.encoding import BatchEncoder
from busreg.server.memo import HeartbeatMemo, KnownBeat
from busreg.server.stats import PartitionStats
from busreg.settings import AuthSettings, Settings
from busreg.wire.auth import service_key, sign
from busreg.wire.codec import encode_event
from busreg.wire.models import Heartbeat
from busreg.wire.routing import partition_for

BEAT = KnownBeat("svc", "i-1", 7, 3000, "{}")


def test_doctests() -> None:
    assert doctest.testmod(memo_module).failed == 0


def _body(seq: str, **extra: object) -> bytes:
    fields = {"v": 1, "service": "svc", "instance_id": "i-1", "seq": "SEQ", **extra}
    return orjson.dumps(fields).replace(b'"SEQ"', seq.encode())


@pytest.mark.parametrize(
    "other",
    [
        "01",  # a leading zero: not JSON
        "1.5",  # not an integer
        "1e3",
        "-1",
        "9007199254740992",  # 2**53: out of range
        '"5"',  # a string: strict validation refuses it
    ],
)
def test_only_a_plain_integer_seq_in_range_is_a_hit(other: str) -> None:
    memo = HeartbeatMemo()
    memo.learn(_body("41"), BEAT)
    assert memo.lookup(_body("42")) == (BEAT, 42)
    assert memo.lookup(_body(other)) is None


def test_a_payload_with_seq_twice_is_never_remembered() -> None:
    memo = HeartbeatMemo()
    tricky = _body("41", metadata={"x": 1}).replace(b'"x":1', b'"seq":1')
    memo.learn(tricky, BEAT)
    assert memo.lookup(tricky) is None


def test_the_memo_stays_bounded() -> None:
    memo = HeartbeatMemo(limit=2)
    for n in range(5):
        memo.learn(_body("1", service=f"s{n}"), BEAT)
    assert len(memo._known) <= 2


def test_the_encoder_gives_the_same_arguments_with_and_without_the_memo() -> None:
    settings = Settings(namespace="m", partitions=2, auth=AuthSettings(mode="enforce", secret="s"))
    service = next(f"svc{i}" for i in range(100) if partition_for(f"svc{i}", 2) == 0)
    key = service_key(b"s", service)

    def beat(seq: int) -> bytes:
        event = Heartbeat(
            service=service, instance_id="i-1", incarnation=9, seq=seq, address="10.0.0.1:80"
        )
        return sign(key, encode_event(event))

    warm = BatchEncoder(settings, 0, PartitionStats())
    warm.encode([(1, 100, beat(1))])  # learnt
    cold = BatchEncoder(settings, 0, PartitionStats())
    assert warm.encode([(2, 200, beat(2))]) == cold.encode([(2, 200, beat(2))])
    assert warm._memo.hits == 1
    # a forged signature is still refused on the fast path
    forged = b"0" * 64 + beat(3)[64:]
    stats = PartitionStats()
    memo_on = BatchEncoder(settings, 0, stats)
    memo_on.encode([(1, 100, beat(1))])
    args = memo_on.encode([(3, 300, forged)])
    assert args[2] == "N"
    assert stats.dead_by_reason == {"unauthorised": 1}
