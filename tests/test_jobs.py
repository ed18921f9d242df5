"""Housekeeping's schedules and rotations, tested alone (pure but for the monotonic clock)."""

from __future__ import annotations

from typing import Any, cast

from capi.worker.jobs import Rotation, Schedule
from capi.worker.sender import Sender


def test_a_schedule_is_due_once_per_interval_and_again_when_asked() -> None:
    hourly = Schedule(3600.0)
    assert hourly.due()
    assert not hourly.due()
    hourly.now_again()
    assert hourly.due()
    assert Schedule(0.0).due() and Schedule(0.0).due()


def test_a_per_destination_schedule_divides_its_interval() -> None:
    prune = Schedule(3600.0, per_destination=True)
    assert prune.due(destinations=1)
    assert not prune.due(destinations=1)
    fast = Schedule(1e-9, per_destination=True)
    assert fast.due(1_000_000) and fast.due(1_000_000)


def test_a_rotation_takes_each_destination_in_turn() -> None:
    senders = cast(dict[str, Sender], {n: cast(Any, n) for n in "abcde"})
    turn = Rotation()
    assert turn.take(senders, 2) == ["a", "b"]
    assert turn.take(senders, 2) == ["c", "d"]
    assert turn.take(senders, 2) == ["e", "a"]
    assert turn.take(senders, 9) == ["b", "c", "d", "e", "a"]  # each at most once
    assert turn.take({}, 3) == []


def test_one_liveness_rule_in_milliseconds_too() -> None:
    from capi import clock

    assert clock.ms(clock.LIVENESS_S) == clock.LIVENESS_MS
    assert clock.LIVENESS_S >= 4 * clock.HEARTBEAT_S  # a late beat or two is not a death
    assert clock.now_ms(lambda: 1.5) == 1500
