"""Which partitions a worker should own, given the live workers: pure arithmetic.

Partition k belongs to the (k mod W)-th live worker in id order, so every worker owns
⌊P/W⌋ or ⌈P/W⌉ partitions once membership is stable, and every worker that sees the same
live set computes the same assignment without talking to the others::

    assigned(["a", "b"], "a", 4) == {0, 2}
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["assigned"]


def assigned(live: Sequence[str], worker_id: str, partitions: int) -> set[int]:
    """Partitions of ``worker_id`` among the sorted ``live`` ids (none if it is not live).

    An empty live set (membership not read yet) counts as this worker alone."""
    members = list(live) or [worker_id]
    if worker_id not in members:
        return set()
    return {k for k in range(partitions) if members[k % len(members)] == worker_id}
