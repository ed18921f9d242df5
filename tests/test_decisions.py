"""The outcome -> fate table and the retry plan, alone: pure, no Redis, no HTTP."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from capi.constants import API_MAX_AGE_MS, STALE_MARGIN_MS
from capi.failures import Reason
from capi.guidance import diagnose
from capi.worker import decisions
from capi.worker.decisions import AFTER_HOLD, AFTER_PROBE, FATES, Action, Outcome, Verdict

NOW_MS = 1_800_000_000_000


def test_every_reason_and_outcome_has_a_fate() -> None:
    missing = [o for o in (*Reason, *Outcome) if o not in FATES]
    assert missing == []
    assert set(AFTER_PROBE) == set(Verdict)


@pytest.mark.parametrize(
    ("outcome", "action", "endpoint_down"),
    [
        (Outcome.DELIVERED, Action.ACKNOWLEDGE, False),
        (Outcome.ACCEPTED_MISMATCH, Action.ACKNOWLEDGE, False),
        (Outcome.STALE, Action.DEAD_LETTER, False),
        (Reason.MISSING_SCOPE, Action.REPROBE, False),
        (Reason.UNAUTHORIZED, Action.REPROBE, False),
        (Reason.ACCESS_DENIED, Action.REPROBE, False),
        (Reason.UNKNOWN_PIXEL, Action.HOLD, False),
        (Reason.NOT_FOUND, Action.HOLD, False),
        (Reason.REQUEST_INVALID, Action.HOLD, False),
        (Reason.INVALID_EVENT, Action.DROP_REJECTED, False),
        (Reason.TOO_LARGE, Action.DROP_REJECTED, False),
        (Reason.OUTSIDE_TIME_WINDOW, Action.DROP_REJECTED, False),
        (Reason.RATE_LIMITED, Action.RETRY, False),  # "slow down", not "down"
        (Reason.SERVER_ERROR, Action.RETRY, True),
        (Reason.NETWORK, Action.RETRY, True),
        (Reason.RETRIES_EXHAUSTED, Action.DEAD_LETTER, False),
        (Reason.UNEXPECTED, Action.DEAD_LETTER, False),
    ],
)
def test_fate_of_each_outcome(
    outcome: Reason | Outcome, action: Action, endpoint_down: bool
) -> None:
    fate = decisions.fate(outcome)
    assert fate.action is action
    assert fate.endpoint_down is endpoint_down


def test_the_table_agrees_with_the_reasons_own_flags() -> None:
    for reason in Reason:
        action = FATES[reason].action
        assert (action is Action.RETRY) == reason.retryable, reason
        assert (action in (Action.REPROBE, Action.HOLD)) == reason.holds, reason
        assert (action is Action.HOLD) == reason.config_problem, reason


def test_a_stale_event_is_dead_lettered_unsent_as_outside_the_window() -> None:
    stale = FATES[Outcome.STALE]
    assert stale.reason is Reason.OUTSIDE_TIME_WINDOW
    assert stale.attempted is False
    assert decisions.stale_before_ms(NOW_MS) == NOW_MS - API_MAX_AGE_MS + STALE_MARGIN_MS


@pytest.mark.parametrize(
    ("verdict", "action"),
    [
        (Verdict.TRANSIENT, Action.RETRY),
        (Verdict.CONFIRMED, Action.DEAD_LETTER),
        (Verdict.ALREADY_HELD, Action.HAND_BACK),
    ],
)
def test_fate_after_a_reprobe(verdict: Verdict, action: Action) -> None:
    assert AFTER_PROBE[verdict].action is action


def test_a_confirmed_configuration_problem_keeps_the_events() -> None:
    assert AFTER_HOLD[Verdict.TRANSIENT].action is Action.RETRY
    assert AFTER_HOLD[Verdict.CONFIRMED].action is Action.HAND_BACK
    assert AFTER_HOLD[Verdict.ALREADY_HELD].action is Action.HAND_BACK


@pytest.mark.parametrize(
    ("accepted", "sent", "outcome"),
    [
        (None, 5, Outcome.DELIVERED),
        (5, 5, Outcome.DELIVERED),
        (4, 5, Outcome.ACCEPTED_MISMATCH),
        (6, 5, Outcome.ACCEPTED_MISMATCH),
    ],
)
def test_a_200_counting_otherwise_is_a_mismatch(
    accepted: int | None, sent: int, outcome: Outcome
) -> None:
    assert decisions.delivered(accepted, sent) is outcome
    assert FATES[outcome].count_mismatch is (outcome is Outcome.ACCEPTED_MISMATCH)


@dataclass
class Ev:
    attempts: int
    timestamp_ms: int


@pytest.mark.parametrize(
    ("events", "retry_after_s", "max_attempts", "again", "exhausted", "delay_s"),
    [
        # rand() = 0.5: equal jitter between base/2 and base * 2**(attempt-1).
        ([Ev(0, NOW_MS)], None, None, 1, 0, 0.75),
        ([Ev(2, NOW_MS), Ev(0, NOW_MS)], None, None, 2, 0, 2.25),  # attempt 3: [0.5, 4]
        ([Ev(0, NOW_MS)], 7.0, None, 1, 0, 7.0),  # Retry-After wins
        ([Ev(0, NOW_MS)], 900.0, None, 1, 0, 900.0),  # ... whatever its length
        ([Ev(0, NOW_MS)], 8 * 86_400.0, None, 0, 1, 8 * 86_400.0),  # past the 7-day window
        ([Ev(2, NOW_MS), Ev(1, NOW_MS)], None, 3, 1, 1, 2.25),  # the cap exhausts one
        # Its next attempt falls past its 7-day window: exhausted.
        ([Ev(0, NOW_MS - API_MAX_AGE_MS + STALE_MARGIN_MS + 500)], None, None, 0, 1, 0.75),
    ],
)
def test_retry_plan(
    events: list[Ev],
    retry_after_s: float | None,
    max_attempts: int | None,
    again: int,
    exhausted: int,
    delay_s: float,
) -> None:
    plan = decisions.plan_retry(
        events,
        now_ms=NOW_MS,
        retry_after_s=retry_after_s,
        base_s=1.0,
        cap_s=60.0,
        max_attempts=max_attempts,
        rand=lambda: 0.5,
    )
    assert plan.delay_s == pytest.approx(delay_s)
    assert plan.due_ms == NOW_MS + int(delay_s * 1000)
    assert plan.attempt == max(e.attempts for e in events) + 1
    assert (len(plan.again), len(plan.exhausted)) == (again, exhausted)


@pytest.mark.parametrize("reason", [r for r in Reason if FATES[r].action == Action.HOLD])
def test_the_guidance_of_a_problem_that_keeps_the_events_offers_no_replay_of_them(
    reason: Reason,
) -> None:
    """Nothing is dead-lettered for it (a confirmed failure hands the batch back): the
    unknown-pixel guidance told the operator to replay dead letters that never exist."""
    fix = " ".join(diagnose(reason).fix)
    assert f"--reason {reason.value}" not in fix
    assert "dead-letters replay" not in fix
