"""A seeded fuzzer of ingest garbage: every kind a worker must dead-letter, with the reason
it must give. Deterministic for a seed, so a failure can be replayed."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

from rstream import AMQPMessage

from busreg.constants import MAX_EVENT_BYTES
from busreg.wire.codec import encode_event
from busreg.wire.models import Heartbeat


def valid(service: str, instance: str, seq: int) -> Heartbeat:
    # the longest TTL: the flood's instances heartbeat only during the burst, and the test
    # checks them after it
    return Heartbeat(
        service=service,
        instance_id=instance,
        incarnation=1,
        seq=seq,
        address="127.0.0.1:8080",
        metadata={"seq": str(seq)},
        ttl=60,
    )


def _base(rng: random.Random, service: str) -> dict[str, object]:
    return json.loads(encode_event(valid(service, f"g-{rng.randrange(10**6)}", 1)))


def garbage(rng: random.Random, service: str, other_service: str) -> Iterator[tuple[bytes, str]]:
    """Endless (bytes, expected dead-letter reason) pairs for a partition owning
    ``service`` (``other_service`` lives in another partition)."""
    kinds = [
        "random",
        "truncated",
        "oversized",
        "version",
        "wrong-type",
        "invalid-value",
        "wrong-partition",
        "amqp-garbage",
        "not-object",
    ]
    while True:
        kind = rng.choice(kinds)
        base = _base(rng, service)
        if kind == "random":
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
            if body[:1] in (b"\x00",):  # keep it out of the AMQP branch: see amqp-garbage
                body = b"#" + body
            yield body, "malformed"
        elif kind == "truncated":
            full = json.dumps(base).encode()
            yield full[: rng.randrange(1, len(full) - 1)], "malformed"
        elif kind == "oversized":
            base["metadata"] = {"blob": "x" * (MAX_EVENT_BYTES + rng.randrange(1, 5000))}
            yield json.dumps(base).encode(), "oversized"
        elif kind == "version":
            base["v"] = rng.choice([0, 3, 99, "1", None, True, 1.5])  # v2: the batch only
            yield json.dumps(base).encode(), "unknown-version"
        elif kind == "wrong-type":
            field, value = rng.choice(
                [
                    ("seq", "2"),
                    ("incarnation", 1.5),
                    ("metadata", ["a"]),
                    ("ttl", "3"),
                    ("address", 8080),
                    ("service", 7),
                ]
            )
            base[field] = value
            yield json.dumps(base).encode(), "invalid"
        elif kind == "invalid-value":
            field, value = rng.choice(
                [
                    ("service", "bad name!"),
                    ("address", "no-port"),
                    ("seq", -1),
                    ("ttl", 0),
                    ("ttl", 3600),
                    ("status", "ALIVE"),
                    ("type", "explode"),
                    ("extra", "field"),
                    ("address", "host:70000"),
                ]
            )
            base[field] = value
            yield json.dumps(base).encode(), "invalid"
        elif kind == "wrong-partition":
            yield (
                encode_event(valid(other_service, f"w-{rng.randrange(10**6)}", 1)),
                "wrong-partition",
            )
        elif kind == "amqp-garbage":
            yield (
                b"\x00Su" + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))),
                "malformed",
            )
        else:
            body = json.dumps(rng.choice([[1, 2], "text", 42, None])).encode()
            yield body, "malformed"


def amqp_wrapped(body: bytes) -> bytes:
    """What RabbitMQ stores for an AMQP 0-9-1 publish: an AMQP 1.0 message."""
    return bytes(AMQPMessage(body=body))
