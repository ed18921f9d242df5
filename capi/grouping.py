"""Concurrent writes grouped into one round trip, without a timer.

A :class:`Coalescer` sends what its callers submit through one function, a group at a time:
the first submission is sent at once (on the event loop's next turn, so an idle server adds
no delay), and whatever is submitted while that round trip is in flight waits and goes
together in the next one, up to ``max_weight`` per group. Each caller gets its own answer,
or its own error: ``send`` answers item by item (an exception for an item fails that
caller alone), and an exception raised by ``send`` itself (the round trip failed) fails
every caller of its group and every caller waiting behind it, so that however many call at
once, a frozen Redis costs each caller at most one timeout.

The intake's producer (:class:`capi.producer.Producer` with ``group_events``) uses it so
that concurrent single-event requests share one Redis round trip.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Sends submitted items in groups through ``send``, one group in flight at a time."""

    def __init__(
        self, send: Callable[[list[T]], Awaitable[list[R | Exception]]], max_weight: int
    ) -> None:
        self._send = send
        self.max_weight = max_weight
        self._waiting: deque[tuple[T, int, asyncio.Future[R]]] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self.pending = 0  # the weight submitted and not yet answered (waiting or in flight)

    async def submit(self, item: T, weight: int = 1) -> R:
        """Send ``item`` in the next group; its answer, or raise its error."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, weight, future))
        self.pending += weight
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        try:
            return await future
        finally:
            self.pending -= weight

    def _take(self) -> list[tuple[T, int, asyncio.Future[R]]]:
        """The next group: waiting items in order, at least one, within ``max_weight``;
        items whose caller has gone (cancelled) are dropped unsent."""
        group: list[tuple[T, int, asyncio.Future[R]]] = []
        weight = 0
        while self._waiting:
            _, w, future = self._waiting[0]
            if future.done():
                self._waiting.popleft()
                continue
            if group and weight + w > self.max_weight:
                break
            group.append(self._waiting.popleft())
            weight += w
        return group

    async def _flush(self) -> None:
        group: list[tuple[T, int, asyncio.Future[R]]] = []
        try:
            while group := self._take():
                try:
                    answers = await self._send([item for item, _, _ in group])
                    if len(answers) != len(group):  # a bug in send: its callers hear of it
                        raise RuntimeError(f"{len(answers)} answers to {len(group)} items")
                except Exception as exc:
                    # The round trip failed (Redis away, frozen past its timeout): so did each
                    # of its callers, and each caller that waited through it, who would
                    # otherwise wait a whole timeout more in the next group.
                    group += self._waiting
                    self._waiting.clear()
                    answers = [exc] * len(group)
                for (_, _, future), answer in zip(group, answers, strict=True):
                    if future.done():  # its caller left while the round trip was in flight
                        continue
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        finally:
            self._flusher = None
            for _, _, future in [*group, *self._waiting]:  # only if the flusher was cancelled
                future.cancel()
