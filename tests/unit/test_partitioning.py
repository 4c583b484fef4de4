"""busreg.wire.routing.partition_for: RabbitMQ-compatible hash routing of services."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from busreg.constants import PARTITION_HASH_SEED
from busreg.wire.routing import partition_for

_MASK = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _MASK


def murmur3_x86_32(data: bytes, seed: int) -> int:
    """Reference MurmurHash3_x86_32 (Austin Appleby), unsigned: the test oracle."""
    c1, c2 = 0xCC9E2D51, 0x1B873593
    h = seed & _MASK
    nblocks = len(data) // 4
    for i in range(nblocks):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = _rotl((k * c1) & _MASK, 15)
        h ^= (k * c2) & _MASK
        h = (_rotl(h, 13) * 5 + 0xE6546B64) & _MASK
    tail = data[4 * nblocks :]
    k = 0
    if len(tail) >= 3:
        k ^= tail[2] << 16
    if len(tail) >= 2:
        k ^= tail[1] << 8
    if tail:
        k ^= tail[0]
        k = _rotl((k * c1) & _MASK, 15)
        h ^= (k * c2) & _MASK
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK
    h ^= h >> 16
    return h


def rabbitmq_partition(routing_key: str, partitions: int) -> int:
    """RabbitMQ's super-stream hash routing: murmur3 32 of UTF-8, seed 104729, unsigned."""
    return murmur3_x86_32(routing_key.encode("utf-8"), 104729) % partitions


@pytest.mark.parametrize(
    ("data", "seed", "expected"),
    [
        (b"", 0, 0),
        (b"", 1, 0x514E28B7),
        (b"", 0xFFFFFFFF, 0x81F16F39),
        (b"\x00\x00\x00\x00", 0, 0x2362F9DE),
        (b"hello", 0, 0x248BFA47),
        (b"The quick brown fox jumps over the lazy dog", 0, 0x2E4FF723),
    ],
)
def test_oracle_matches_published_murmur3_vectors(data: bytes, seed: int, expected: int) -> None:
    assert murmur3_x86_32(data, seed) == expected


def test_seed_is_rabbitmqs() -> None:
    assert PARTITION_HASH_SEED == 104729


# Pinned: a change of hash, seed, encoding or signedness moves every service to another
# partition, stranding its state in Redis; this must never happen silently.
PINNED = {
    # name: (unsigned murmur3 with seed 104729, partition of 8, partition of 7)
    "inventory": (0xE9F01F66, 6, 1),
    "orders": (0xCFF2FC98, 0, 3),
    "payments": (0x797C9626, 6, 6),
    "gateway": (0x21B437D2, 2, 4),
    "服务": (0xBD8F00EB, 3, 3),
    "svc-42": (0x14D74623, 3, 2),
}


@pytest.mark.parametrize(("name", "expected"), PINNED.items())
def test_stable_and_pinned(name: str, expected: tuple[int, int, int]) -> None:
    hash32, p8, p7 = expected
    assert murmur3_x86_32(name.encode("utf-8"), PARTITION_HASH_SEED) == hash32
    assert [partition_for(name, 8) for _ in range(3)] == [p8] * 3
    assert partition_for(name, 7) == p7


def test_hash_is_unsigned() -> None:
    # "inventory" hashes above 2**31: a signed 32-bit hash would give another partition
    hash32 = PINNED["inventory"][0]
    assert hash32 >= 2**31
    assert partition_for("inventory", 7) == hash32 % 7
    assert partition_for("inventory", 7) != (hash32 - 2**32) % 7


@pytest.mark.parametrize("partitions", [1, 2, 3, 7, 8, 64, 256])
def test_in_range(partitions: int) -> None:
    seen = {partition_for(f"service-{i}", partitions) for i in range(2000)}
    assert seen <= set(range(partitions))
    assert len(seen) == min(partitions, 2000)  # every partition is used


@pytest.mark.parametrize("partitions", [0, -1])
def test_rejects_non_positive_partition_count(partitions: int) -> None:
    with pytest.raises(ValueError, match="partitions"):
        partition_for("inventory", partitions)


def test_spreads_evenly_over_8_partitions() -> None:
    n, p = 10_000, 8
    counts = Counter(partition_for(f"service-{i}", p) for i in range(n))
    expected = n / p
    chi2 = sum((counts[k] - expected) ** 2 / expected for k in range(p))
    # 7 degrees of freedom: P(chi2 > 29.9) = 1e-4 for a uniform hash
    assert chi2 < 29.9, (chi2, dict(counts))
    assert min(counts.values()) > expected * 0.9


@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=120), partitions=st.integers(min_value=1, max_value=512))
def test_matches_rabbitmq_hash_routing(name: str, partitions: int) -> None:
    assert partition_for(name, partitions) == rabbitmq_partition(name, partitions)
