"""Heartbeats already validated once (pure; no I/O).

An instance's heartbeats are byte for byte the same event but for ``seq``: validating each
with pydantic was most of the worker's CPU per heartbeat (12 µs of 12.5 in the encoder).
``HeartbeatMemo`` remembers, per validated heartbeat, its JSON with the seq digits cut out;
a later payload that is that JSON with other digits put back is the same heartbeat with a
new seq, so only the seq needs checking. Anything else takes the full path.

Why the cut is safe: a payload is remembered only if ``"seq":`` occurs in it once (the seq
field; inside a JSON string the quotes would be escaped), and removing the digits cannot
create another occurrence, so a payload that matches a remembered key is that key with
digits at the same place: the same event, another seq. Signatures are still checked per
message (they cover the seq).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MEMO_MAX", "HeartbeatMemo", "KnownBeat"]

#: Heartbeats remembered (about 400 B each); past it the memo starts again, so memory stays
#: bounded (~40 MB) whatever arrives. A worker whose partitions hold more instances than
#: this takes the full path for the rest.
MEMO_MAX = 100_000
#: the seq field: an integer without leading zeros, of at most 16 digits (seq < 2**53)
_SEQ = re.compile(rb'"seq":(0|[1-9][0-9]{0,15})(?=[,}])')
_SEQ_LIMIT = 2**53


@dataclass(frozen=True, slots=True)
class KnownBeat:
    """What the worker needs of a validated heartbeat, seq aside."""

    service: str
    instance_id: str
    incarnation: int
    ttl_ms: int
    stored: str  # encode_stored(event)


class HeartbeatMemo:
    """``lookup(payload)`` → (known heartbeat, seq) or None; ``learn`` after a validation.

    >>> memo = HeartbeatMemo()
    >>> beat = KnownBeat("svc", "i-1", 7, 3000, "{}")
    >>> memo.learn(b'{"v":1,"service":"svc","seq":41,"type":"heartbeat"}', beat)
    >>> memo.lookup(b'{"v":1,"service":"svc","seq":42,"type":"heartbeat"}') == (beat, 42)
    True
    >>> memo.lookup(b'{"v":1,"service":"other","seq":42,"type":"heartbeat"}') is None
    True
    """

    def __init__(self, limit: int = MEMO_MAX) -> None:
        self._limit = limit
        self._known: dict[bytes, KnownBeat] = {}
        self.hits = 0

    def lookup(self, payload: bytes) -> tuple[KnownBeat, int] | None:
        match = _SEQ.search(payload)
        if match is None:
            return None
        known = self._known.get(payload[: match.start(1)] + payload[match.end(1) :])
        if known is None:
            return None
        seq = int(match.group(1))
        if seq >= _SEQ_LIMIT:
            return None
        self.hits += 1
        return known, seq

    def learn(self, payload: bytes, beat: KnownBeat) -> None:
        if payload.count(b'"seq":') != 1:
            return
        match = _SEQ.search(payload)
        if match is None:
            return
        if len(self._known) >= self._limit:
            self._known.clear()
        self._known[payload[: match.start(1)] + payload[match.end(1) :]] = beat
