"""Housekeeping's building blocks: a :class:`Job` (a name, a :class:`Schedule` and a
callable), and a :class:`Rotation` that takes destinations in turn. Typed objects, so a
job is found by grepping its name, not reached through ``getattr`` on attribute names."""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capi.worker.sender import Sender


class Schedule:
    """When a job runs: every ``every_s`` (divided by the number of destinations when
    ``per_destination``: a job that does one destination per run), or at once when asked."""

    def __init__(self, every_s: float, *, per_destination: bool = False) -> None:
        self.every_s = every_s
        self.per_destination = per_destination
        self._last = float("-inf")

    def due(self, destinations: int = 1) -> bool:
        """Whether the job is due now; if so, it counts as run now."""
        every_s = self.every_s / max(1, destinations) if self.per_destination else self.every_s
        now = time.monotonic()
        if now - self._last >= every_s:
            self._last = now
            return True
        return False

    def now_again(self) -> None:
        """Make the job due at the next tick."""
        self._last = float("-inf")


@dataclass(frozen=True)
class Job:
    """A housekeeping job: its name (said in the log when it fails), its schedule, and what
    it does with the destinations served and the time (Unix ms)."""

    name: str
    schedule: Schedule
    run: Callable[[dict[str, Sender], int], Awaitable[None]]


class Rotation:
    """A turn over the destinations: each call takes the next ``count`` of them."""

    def __init__(self) -> None:
        self._turn = 0

    def take(self, senders: dict[str, Sender], count: int) -> list[Sender]:
        """The next ``count`` senders in turn (each at most once)."""
        if not senders:
            return []
        values = list(senders.values())
        start = self._turn % len(values)
        self._turn = start + count
        picked = itertools.islice(itertools.cycle(values), start, start + min(count, len(values)))
        return list(picked)
