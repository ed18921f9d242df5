"""capi.grouping.Coalescer on its own: what goes in which round trip, and who gets which
answer or error (the send function records its groups; no Redis)."""

from __future__ import annotations

import asyncio

import pytest

from capi.grouping import Coalescer


class Trips:
    """A send function that records each group, answers each item doubled (an item < 0
    with its own error), and can be held in flight or made to fail."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.fail: Exception | None = None

    async def send(self, items: list[int]) -> list[int | Exception]:
        self.groups.append(items)
        self.entered.set()
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [ValueError(f"bad {i}") if i < 0 else i * 2 for i in items]


async def held_first(trips: Trips, coalescer: Coalescer[int, int]) -> asyncio.Task[int]:
    """Submit 0 and hold its round trip in flight."""
    trips.gate.clear()
    trips.entered.clear()
    first = asyncio.create_task(coalescer.submit(0))
    await trips.entered.wait()
    return first


def test_an_idle_submission_goes_alone_and_the_ones_behind_it_go_together() -> None:
    async def go() -> None:
        trips = Trips()
        coalescer = Coalescer(trips.send, max_weight=10)
        assert await coalescer.submit(5) == 10  # idle: sent at once, alone
        first = await held_first(trips, coalescer)
        behind = [asyncio.create_task(coalescer.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0)
        assert coalescer.pending == 6
        trips.gate.set()
        assert await first == 0
        assert [await t for t in behind] == [2, 4, 6, 8, 10]
        assert trips.groups == [[5], [0], [1, 2, 3, 4, 5]]
        assert coalescer.pending == 0

    asyncio.run(go())


def test_a_group_holds_at_most_max_weight() -> None:
    async def go() -> None:
        trips = Trips()
        coalescer = Coalescer(trips.send, max_weight=4)
        first = await held_first(trips, coalescer)
        behind = [asyncio.create_task(coalescer.submit(i, weight=2)) for i in range(1, 6)]
        heavy = asyncio.create_task(coalescer.submit(9, weight=50))  # alone, never split
        await asyncio.sleep(0)
        trips.gate.set()
        await asyncio.gather(first, *behind, heavy)
        assert trips.groups == [[0], [1, 2], [3, 4], [5], [9]]

    asyncio.run(go())


def test_an_item_error_is_its_callers_alone() -> None:
    async def go() -> None:
        trips = Trips()
        coalescer = Coalescer(trips.send, max_weight=10)
        first = await held_first(trips, coalescer)
        good = asyncio.create_task(coalescer.submit(3))
        bad = asyncio.create_task(coalescer.submit(-1))
        await asyncio.sleep(0)
        trips.gate.set()
        assert await first == 0 and await good == 6
        with pytest.raises(ValueError, match="bad -1"):
            await bad
        assert trips.groups == [[0], [3, -1]]

    asyncio.run(go())


def test_a_failed_round_trip_fails_its_group_and_every_caller_waiting_behind_it() -> None:
    async def go() -> None:
        trips = Trips()
        coalescer = Coalescer(trips.send, max_weight=10)
        first = await held_first(trips, coalescer)
        behind = [asyncio.create_task(coalescer.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        trips.fail = ConnectionError("Redis is away")
        trips.gate.set()
        for task in (first, *behind):
            with pytest.raises(ConnectionError):
                await task
        assert trips.groups == [[0]]  # the waiting were not sent into the outage
        trips.fail = None
        assert await coalescer.submit(7) == 14  # the next caller starts afresh

    asyncio.run(go())


def test_a_caller_that_left_before_its_round_trip_is_not_sent() -> None:
    async def go() -> None:
        trips = Trips()
        coalescer = Coalescer(trips.send, max_weight=10)
        first = await held_first(trips, coalescer)
        gone = asyncio.create_task(coalescer.submit(1))
        stays = asyncio.create_task(coalescer.submit(2))
        await asyncio.sleep(0)
        gone.cancel()
        trips.gate.set()
        assert await first == 0 and await stays == 4
        assert gone.cancelled()
        assert trips.groups == [[0], [2]]

    asyncio.run(go())


def test_a_send_that_answers_the_wrong_number_of_items_fails_its_callers_with_an_error() -> None:
    """Not a cancellation: the callers (the intake) tell an error from a client gone."""

    async def short(items: list[int]) -> list[int | Exception]:
        return items[1:]

    async def go() -> None:
        coalescer: Coalescer[int, int] = Coalescer(short, max_weight=10)
        with pytest.raises(RuntimeError, match="0 answers to 1 items"):
            await coalescer.submit(1)

    asyncio.run(go())
