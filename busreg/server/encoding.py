"""Turning a batch of stream messages into ``apply.lua``'s arguments.

Each message becomes 8 arguments (see apply.lua). What cannot be applied (malformed,
oversized, unknown version, wrong partition, unauthorised) becomes a dead letter in the
same atomic step, so one bad message never stops a partition (invariant 6). No I/O.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import orjson

from busreg import constants as c
from busreg.constants import MAX_EVENT_BYTES
from busreg.errors import InvalidEvent
from busreg.server.memo import HeartbeatMemo, KnownBeat
from busreg.server.stats import PartitionStats
from busreg.settings import Settings
from busreg.wire.auth import Authorizer, split_signed
from busreg.wire.codec import (
    UNAUTHORISED,
    WRONG_PARTITION,
    DecodedEvent,
    decode_ingest,
    decode_item,
    encode_stored,
)
from busreg.wire.models import Deregister, Heartbeat, Heartbeats, SetStatus, Tick
from busreg.wire.routing import partition_for

__all__ = ["DEAD_LETTER_BODY_MAX", "BatchEncoder"]

log = logging.getLogger("busreg.worker")

SEP = c.FIELD_SEPARATOR
#: Dead letters keep at most this much of the original message: enough to see what sent it.
#: The whole message stays in the retained stream at (stream, offset); copying it into the
#: Redis outbox would let a flood of garbage fill a noeviction Redis (64 KiB became ~87 KB
#: of base64 per bad message).
DEAD_LETTER_BODY_MAX = 512


class BatchEncoder:
    """Encodes one partition's messages; counts dead letters in ``stats``."""

    def __init__(self, settings: Settings, partition: int, stats: PartitionStats) -> None:
        self._settings = settings
        self.partition = partition
        self.stats = stats
        self._stream = c.ingest_partition(settings.namespace, partition)
        self._cache: dict[str, int] = {}
        self._memo = HeartbeatMemo()
        auth = settings.auth
        self._authorizer = (
            Authorizer(auth.secret_bytes(), auth.owners, auth.accept_unsigned_amqp)
            if auth.mode == "enforce"
            else None
        )

    def _dead_letter(self, reason: str, detail: str, offset: int, body: bytes) -> str:
        self.stats.dead_lettered += 1
        self.stats.dead_by_reason[reason] = self.stats.dead_by_reason.get(reason, 0) + 1
        record = {
            "v": c.PROTOCOL_VERSION,
            "reason": reason,
            "detail": detail[:500],
            "stream": self._stream,
            "partition": self.partition,
            "offset": offset,
            "size": len(body),
            "body_b64": base64.b64encode(body[:DEAD_LETTER_BODY_MAX]).decode(),
        }
        dlx = c.dead_letter_exchange(self._settings.namespace)
        return f"{dlx}{SEP}{reason}{SEP}" + orjson.dumps(record).decode()

    def _override(
        self, event: SetStatus, decoded: DecodedEvent, offset: int, ts: int
    ) -> tuple[Any, ...]:
        """op O: an operator's status override, with the identity the worker verified."""
        identity = None
        if self._authorizer is not None:
            refusal, identity = self._authorizer.check_override(
                event.service, decoded.payload, decoded.signature, decoded.user_id
            )
            if refusal is not None:
                raise InvalidEvent(UNAUTHORISED, refusal)
        record = orjson.dumps(
            {"by": event.by, "identity": identity, "reason": event.reason},
            option=orjson.OPT_SORT_KEYS,
        ).decode()
        return (offset, ts, "O", event.service, event.instance_id, event.status or "", 0, record)

    def _partition_of(self, service: str) -> int:
        k = self._cache.get(service)
        if k is None:
            k = self._cache[service] = partition_for(service, self._settings.partitions)
            if len(self._cache) > 100_000:  # bounded memory whatever arrives
                self._cache.clear()
        return k

    def _event_args(
        self, decoded: DecodedEvent, offset: int, ts: int, upsert: str = "U"
    ) -> tuple[Any, ...]:
        """apply.lua's 8 arguments of one decoded event; InvalidEvent if it may not apply."""
        event = decoded.event
        if isinstance(event, Tick):
            if event.outage and self._authorizer is not None:
                refusal = self._authorizer.check_worker(decoded.payload, decoded.signature)
                if refusal is not None:
                    raise InvalidEvent(UNAUTHORISED, refusal)
            return (offset, ts, "G" if event.outage else "N", "", "", "", 0, "")
        if isinstance(event, Heartbeats):
            # its items follow as their own groups (op u), see encode()
            return (offset, ts, "B", "", "", "", len(event.items), "")
        k = self._partition_of(event.service)
        if k != self.partition:
            raise InvalidEvent(
                WRONG_PARTITION, f"service {event.service!r} belongs to partition {k}"
            )
        if isinstance(event, SetStatus):
            return self._override(event, decoded, offset, ts)
        if self._authorizer is not None:
            refusal = self._authorizer.check(
                event.service, decoded.payload, decoded.signature, decoded.user_id
            )
            if refusal is not None:
                raise InvalidEvent(UNAUTHORISED, refusal)
        version = f"{event.incarnation:020d}{event.seq:016d}"
        if isinstance(event, Deregister):
            return (offset, ts, "D", event.service, event.instance_id, version, 0, "")
        return (
            offset,
            ts,
            upsert,
            event.service,
            event.instance_id,
            version,
            int(event.ttl * 1000),
            encode_stored(event),
        )

    def _refused(self, exc: Exception, offset: int, body: bytes, what: str = "") -> str:
        """The dead letter of a message (or of one item of a batch) that cannot apply."""
        bad = exc if isinstance(exc, InvalidEvent) else None
        if bad is None:
            log.exception(
                "unexpected decode failure partition=%d offset=%d", self.partition, offset
            )
            bad = InvalidEvent("invalid", f"decoder failure: {exc!r}")
        log.warning(
            "dead-letter partition=%d offset=%d%s reason=%s detail=%s",
            self.partition,
            offset,
            what,
            bad.reason,
            bad.detail[:200],
        )
        return self._dead_letter(bad.reason, bad.detail, offset, body)

    def _known_beat(
        self, body: bytes, offset: int, ts: int, upsert: str, user_id: str | None = None
    ) -> tuple[Any, ...] | None:
        """apply.lua's arguments of a heartbeat the memo knows but for its seq (None: take
        the full path); InvalidEvent if it may not apply."""
        if len(body) > MAX_EVENT_BYTES:
            return None
        signature, payload = split_signed(body)
        hit = self._memo.lookup(payload) if payload[:1] == b"{" else None
        if hit is None:
            return None
        beat, seq = hit
        if self._partition_of(beat.service) != self.partition:
            return None  # the full path says why
        if self._authorizer is not None:
            refusal = self._authorizer.check(beat.service, payload, signature, user_id)
            if refusal is not None:
                raise InvalidEvent(UNAUTHORISED, refusal)
        version = f"{beat.incarnation:020d}{seq:016d}"
        return (
            offset,
            ts,
            upsert,
            beat.service,
            beat.instance_id,
            version,
            beat.ttl_ms,
            beat.stored,
        )

    def _learn(self, decoded: DecodedEvent, group: tuple[Any, ...]) -> None:
        event = decoded.event
        if isinstance(event, Heartbeat) and decoded.payload:
            self._memo.learn(
                decoded.payload,
                KnownBeat(event.service, event.instance_id, event.incarnation, group[6], group[7]),
            )

    def encode(self, batch: list[tuple[int, int, bytes]]) -> list[Any]:
        args: list[Any] = []
        for offset, ts, body in batch:
            try:
                known = self._known_beat(body, offset, ts, "U")
                if known is not None:
                    args += known
                    continue
                decoded = decode_ingest(body)
                group = self._event_args(decoded, offset, ts)
                self._learn(decoded, group)
                args += group
            except Exception as exc:  # one bad message must never stop a partition
                args += (offset, ts, "N", "", "", "", 0, self._refused(exc, offset, body))
                continue
            if isinstance(decoded.event, Heartbeats):
                # A batch: one message, one offset. Its items follow as groups of their own
                # (u: a heartbeat, x: an item refused alone, with its dead letter) that
                # apply.lua applies with the batch's offset and clock, or skips with it.
                for i, item in enumerate(decoded.event.items):
                    try:
                        raw = item.encode()
                        known = self._known_beat(raw, offset, ts, "u", decoded.user_id)
                        if known is not None:
                            args += known
                            continue
                        one = decode_item(item, decoded.user_id)
                        group = self._event_args(one, offset, ts, "u")
                        self._learn(one, group)
                        args += group
                    except Exception as exc:  # one bad item must not refuse the others
                        dead = self._refused(exc, offset, item.encode(), f" item={i}")
                        args += (offset, ts, "x", "", "", "", 0, dead)
        return args
