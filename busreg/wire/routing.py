"""Which partition a service lives in. Pure; no I/O.

busreg uses RabbitMQ's own super-stream hash routing (murmur3 32-bit of the UTF-8 routing
key, seed 104729, unsigned, modulo P), with the service name as routing key. A stream client
in any language that routes by hash with the service as key writes where busreg expects.
"""

from __future__ import annotations

import mmh3

from busreg.constants import PARTITION_HASH_SEED

__all__ = ["partition_for"]


def partition_for(service: str, partitions: int) -> int:
    """Partition ``0 <= k < partitions`` that owns ``service``.

    >>> partition_for("inventory", 8) == partition_for("inventory", 8)
    True
    """
    if partitions < 1:
        raise ValueError("partitions must be >= 1")
    return int(mmh3.hash(service.encode("utf-8"), PARTITION_HASH_SEED, signed=False)) % partitions
