"""Cutting events into requests and splitting a batch the API rejected: pure functions,
used by the sender and by replay's dry run, so both keep to the same limits and isolate bad
events the same way."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def split_rejected(group: Sequence[T], index: int | None) -> tuple[T | None, list[list[T]]]:
    """After the API rejected ``group`` naming ``events[index]`` (or no index): the event
    known to be bad, if any, and the groups to send again.

    With an index inside the batch, that event is the bad one and the rest go again at
    once. Without one, a single event is itself the bad one, and a larger batch is halved
    (bisection: ``log2(n)`` more requests per bad event, never one request per event).
    """
    if index is not None and 0 <= index < len(group):
        rest = [*group[:index], *group[index + 1 :]]
        return group[index], [rest] if rest else []
    if len(group) == 1:
        return group[0], []
    middle = len(group) // 2
    return None, [list(group[middle:]), list(group[:middle])]


def drop_rejected(group: Sequence[T], indexes: Sequence[int]) -> tuple[list[int], list[list[T]]]:
    """After the API rejected ``group`` naming ``events[i]`` for each of ``indexes``: the
    indexes of the events known to be bad, and the groups to send again.

    Every event an answer names is bad at once (an answer that lists three hundred
    rejected events costs one request, not three hundred); the rest go again together.
    Naming none inside the batch, the batch is split as :func:`split_rejected` does.
    """
    bad = sorted({i for i in indexes if 0 <= i < len(group)})
    if bad:
        named = set(bad)
        rest = [e for i, e in enumerate(group) if i not in named]
        return bad, [rest] if rest else []
    one, again = split_rejected(group, None)
    return ([0] if one is not None else []), again


def by_size(
    items: Sequence[T], size: Callable[[T], int], *, max_bytes: int, max_count: int | None = None
) -> list[list[T]]:
    """``items`` in order, cut into groups of at most ``max_count`` whose sizes (plus a
    separator byte each) add up to at most ``max_bytes``. An item too large on its own is
    a group of its own: the API's 413 then names it alone."""
    groups: list[list[T]] = []
    current: list[T] = []
    total = 0
    for item in items:
        n = size(item) + 1
        if current and (total + n > max_bytes or len(current) == max_count):
            groups.append(current)
            current, total = [], 0
        current.append(item)
        total += n
    if current:
        groups.append(current)
    return groups
