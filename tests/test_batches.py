"""split_rejected: how a rejected batch is split, table-driven."""

from __future__ import annotations

import pytest

from capi.batches import split_rejected


@pytest.mark.parametrize(
    ("group", "index", "bad", "again"),
    [
        ([1, 2, 3], 1, 2, [[1, 3]]),
        ([1, 2, 3], 0, 1, [[2, 3]]),
        ([7], 0, 7, []),
        ([7], None, 7, []),  # one event and no index: it is the bad one
        ([1, 2, 3, 4], None, None, [[3, 4], [1, 2]]),  # bisect
        ([1, 2, 3], 9, None, [[2, 3], [1]]),  # an index outside the batch is no index
        ([1, 2], -1, None, [[2], [1]]),
    ],
)
def test_split_rejected(
    group: list[int], index: int | None, bad: int | None, again: list[list[int]]
) -> None:
    assert split_rejected(group, index) == (bad, again)
