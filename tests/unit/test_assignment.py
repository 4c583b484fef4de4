"""busreg.server.assignment: every live worker computes the same balanced assignment."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from busreg.server.assignment import assigned


def test_round_robin_over_sorted_ids() -> None:
    assert assigned(["a", "b"], "a", 4) == {0, 2}
    assert assigned(["a", "b"], "b", 4) == {1, 3}
    assert assigned(["a", "b"], "c", 4) == set()  # not live: owns nothing
    assert assigned([], "a", 3) == {0, 1, 2}  # membership not read yet: alone


@given(
    st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=12, unique=True),
    st.integers(min_value=1, max_value=64),
)
def test_partitions_are_covered_once_and_balanced(ids: list[str], partitions: int) -> None:
    live = sorted(ids)
    shares = [assigned(live, w, partitions) for w in live]
    owned = [k for share in shares for k in share]
    assert sorted(owned) == list(range(partitions))  # each partition exactly once
    sizes = {len(s) for s in shares}
    assert max(sizes) - min(sizes) <= 1
