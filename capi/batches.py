"""Splitting a batch the API rejected: pure functions, used by the sender and by replay's
dry run, so both isolate bad events the same way."""

from __future__ import annotations

from collections.abc import Sequence
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
