"""Encoding and decoding of the bytes on the wire. Pure; no I/O.

Ingest partitions hold two encodings side by side:

* raw JSON written by busreg's stream-protocol publishers (``{`` is the first byte);
* AMQP 1.0 messages, which is how RabbitMQ stores what AMQP 0-9-1 publishers (any language,
  FastStream, ``rabbitmqadmin``) route into a stream; the JSON is the message body and the
  broker-validated ``user_id`` travels in its properties.

``decode_ingest`` turns either into a validated event or raises ``InvalidEvent`` with a
stable reason code used for dead-lettering and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from busreg.constants import MAX_BATCH_BYTES, MAX_EVENT_BYTES, PROTOCOL_VERSIONS
from busreg.errors import InvalidEvent
from busreg.wire.amqp10 import MalformedAmqp, check_message
from busreg.wire.auth import split_signed
from busreg.wire.models import (
    Deregister,
    Heartbeat,
    Heartbeats,
    Instance,
    Register,
    SetStatus,
    Tick,
    ingest_adapter,
    validation_message,
)

__all__ = [
    "DecodedEvent",
    "decode_ingest",
    "decode_item",
    "encode_event",
    "encode_instance",
    "encode_stored",
]

Event = Register | Heartbeat | Deregister | SetStatus | Tick | Heartbeats

# Reason codes (stable: they appear in dead letters and metric labels).
OVERSIZED = "oversized"
MALFORMED = "malformed"
UNKNOWN_VERSION = "unknown-version"
INVALID = "invalid"
WRONG_PARTITION = "wrong-partition"
UNAUTHORISED = "unauthorised"

#: AMQP 1.0 section descriptors (0x00 0x53 <code>): header .. amqp-value. A message starting
#: with one of these came from an AMQP publisher; anything else is parsed as JSON.
_AMQP_SECTIONS = frozenset(bytes([code]) for code in range(0x70, 0x78))


@dataclass(frozen=True, slots=True)
class DecodedEvent:
    """A validated event, the identity the broker vouched for (AMQP path only), and the
    signature with the exact bytes it covers (signed events only)."""

    event: Event
    user_id: str | None
    signature: bytes | None = None
    payload: bytes = b""


def encode_event(event: Event) -> bytes:
    """JSON bytes of an event, as busreg's publishers write them."""
    return orjson.dumps(event.model_dump(mode="json"))


def _refusal(body: bytes, exc: ValidationError) -> InvalidEvent:
    """The InvalidEvent, with its reason code, of a body the models refused."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        return InvalidEvent(MALFORMED, f"invalid JSON: {err}")
    if not isinstance(data, dict):
        return InvalidEvent(MALFORMED, "event must be a JSON object")
    version = data.get("v")
    if type(version) is not int or version not in PROTOCOL_VERSIONS:
        return InvalidEvent(UNKNOWN_VERSION, f"v={version!r}, this worker speaks {_SPOKEN}")
    return InvalidEvent(INVALID, validation_message(exc, where="event"))


def encode_stored(event: Register | Heartbeat) -> str:
    """The instance as the worker stores it in Redis: ``encode_instance(event.instance())``
    without ``service`` and ``instance_id`` (the hash key and field hold them; leaving them
    out saves ~45 B per instance). ``apply.lua`` and ``snapshot.lua`` splice them back in
    front of what subscribers see. Built without an Instance (the worker's hot path: a
    third of the cost); sorted keys, so equal instances give equal strings."""
    return orjson.dumps(
        {
            "incarnation": event.incarnation,
            "address": event.address,
            "zone": event.zone,
            "status": event.status.value,
            "metadata": event.metadata,
            "ttl": event.ttl,
        },
        option=orjson.OPT_SORT_KEYS,
    ).decode()


def encode_instance(instance: Instance) -> str:
    """Canonical JSON of an instance (sorted keys): the worker compares these strings to
    tell a plain heartbeat (no change, no delta) from a modification."""
    # without "override": null, as the worker's own JSON (apply.lua adds it only when set)
    return orjson.dumps(
        instance.model_dump(mode="json", exclude_none=True), option=orjson.OPT_SORT_KEYS
    ).decode()


def _unwrap_amqp(body: bytes) -> tuple[bytes, str | None]:
    from rstream import amqp_decoder

    try:
        # rstream's decoder trusts declared sizes and counts: check them first (see amqp10)
        check_message(body)
    except MalformedAmqp as exc:
        raise InvalidEvent(MALFORMED, f"not JSON and not an AMQP 1.0 message: {exc}") from exc
    try:
        message = amqp_decoder(body)
    except Exception as exc:  # the decoder raises assorted types on garbage
        raise InvalidEvent(MALFORMED, f"not JSON and not an AMQP 1.0 message ({exc!r})") from exc
    payload: Any = message.body
    if isinstance(payload, list):  # several data sections: concatenate bytes ones only
        if not all(isinstance(part, bytes | bytearray) for part in payload):
            raise InvalidEvent(MALFORMED, "AMQP body sections are not all binary data")
        if sum(len(part) for part in payload) > MAX_BATCH_BYTES:
            raise InvalidEvent(OVERSIZED, f"AMQP body > {MAX_BATCH_BYTES} bytes")
        payload = b"".join(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise InvalidEvent(MALFORMED, "AMQP message has no data body")
    user_id = None
    properties = message.properties
    if properties is not None and getattr(properties, "user_id", None):
        raw = properties.user_id
        try:
            user_id = raw.decode() if isinstance(raw, bytes | bytearray) else str(raw)
        except UnicodeDecodeError as exc:
            raise InvalidEvent(MALFORMED, "user_id is not UTF-8") from exc
    return bytes(payload), user_id


_SPOKEN = "v=" + " and v=".join(map(str, PROTOCOL_VERSIONS))


def decode_ingest(body: bytes) -> DecodedEvent:
    """Validate one ingest message. Raises InvalidEvent(reason) for anything unusable.

    A batched heartbeat (``Heartbeats``) comes back as it is: its items are decoded one by
    one with ``decode_item``, each refused alone."""
    if len(body) > MAX_BATCH_BYTES:
        raise InvalidEvent(OVERSIZED, f"{len(body)} bytes > {MAX_BATCH_BYTES}")
    user_id: str | None = None
    if body[:2] == b"\x00S" and body[2:3] in _AMQP_SECTIONS:
        body, user_id = _unwrap_amqp(body)
    if len(body) <= MAX_EVENT_BYTES:
        return _decode(body, user_id)
    try:  # only a batch may be larger; anything else that big is refused as oversized
        decoded: DecodedEvent | None = _decode(body, user_id)
    except InvalidEvent:
        decoded = None
    if decoded is None or not isinstance(decoded.event, Heartbeats):
        raise InvalidEvent(OVERSIZED, f"{len(body)} bytes > {MAX_EVENT_BYTES}")
    return decoded


def decode_item(item: str, user_id: str | None) -> DecodedEvent:
    """One item of a batched heartbeat: a heartbeat as it would be sent alone (signed or
    not); ``user_id`` is the batch's (AMQP path). Raises InvalidEvent like decode_ingest."""
    body = item.encode()
    if len(body) > MAX_EVENT_BYTES:
        raise InvalidEvent(OVERSIZED, f"item of {len(body)} bytes > {MAX_EVENT_BYTES}")
    decoded = _decode(body, user_id)
    if not isinstance(decoded.event, Heartbeat):
        raise InvalidEvent(INVALID, f"a batch holds heartbeats only, not {decoded.event.type!r}")
    return decoded


def _decode(body: bytes, user_id: str | None) -> DecodedEvent:
    signature, body = split_signed(body)
    try:
        # one strict pass for valid events ("seq": "2" is a client bug to surface, not a
        # value to coerce; JSON mode still reads enum values from their strings); only a
        # refused body is parsed again, to name its reason
        event = ingest_adapter.validate_json(body, strict=True)
    except ValidationError as exc:
        raise _refusal(body, exc) from exc
    if "v" not in event.model_fields_set:
        raise InvalidEvent(UNKNOWN_VERSION, f"v missing, this worker speaks {_SPOKEN}")
    return DecodedEvent(event, user_id, signature, body)
