"""What becomes of a batch: one table from outcome to fate, and the retry plan.

Every outcome of a send (a failure :class:`~capi.failures.Reason`, or an :class:`Outcome`
such as a delivery) has one row in :data:`FATES`; :mod:`capi.worker.sender` looks the
fate up and carries it out, :mod:`capi.worker.fates` records it. A new failure class is a
new ``Reason`` and one line here (a test checks that every ``Reason`` has a row).

=====================  =========================================================
outcome                fate
=====================  =========================================================
delivered              acknowledge
accepted_mismatch      acknowledge, and count it (the docs promise all or none)
stale (caught locally) dead-letter as outside_time_window, never sent
missing_scope          re-probe the key, then :data:`AFTER_PROBE`: transient ->
unauthorized           retry; confirmed -> dead-letter (the guard holds the
access_denied          destination); already held -> hand back
unknown_pixel          re-probe, then :data:`AFTER_HOLD`: transient -> retry;
not_found              confirmed or already held -> hand back (the guard holds the
request_invalid        destination: its settings are wrong, not its events)
invalid_event          dead-letter the events the answer names, resend the rest
outside_time_window    at once (no index: bisect)
too_large              split the batch (bisect); a single event: dead-letter
rate_limited           retry with backoff (Retry-After honoured whatever its length)
server_error, network  retry with backoff, and mark the endpoint failing
retries_exhausted      dead-letter
unexpected             dead-letter with the raw answer
=====================  =========================================================

Everything here is pure: no Redis, no clock of its own, randomness as a parameter.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Generic, Protocol, TypeVar

from capi.clock import ms
from capi.constants import API_MAX_AGE_MS, STALE_MARGIN_MS
from capi.failures import Reason
from capi.retry import backoff_s, within_budget


class Outcome(enum.StrEnum):
    """What became of a send besides a failure :class:`Reason`."""

    DELIVERED = "delivered"
    # A 200 whose accepted_events differs from the number of events sent.
    ACCEPTED_MISMATCH = "accepted_mismatch"
    # Found outside the API's time window before sending: never sent.
    STALE = "stale"


class Verdict(enum.Enum):
    """What a key failure turned out to be, once the key guard re-probed."""

    TRANSIENT = "transient"
    CONFIRMED = "confirmed"
    ALREADY_HELD = "already_held"


class Action(enum.StrEnum):
    """What the sender does with a batch."""

    ACKNOWLEDGE = "acknowledge"
    RETRY = "retry"  # backoff; events whose next attempt falls past their budget: dead letters
    REPROBE = "reprobe"  # the key guard re-probes; the verdict's row in AFTER_PROBE follows
    HOLD = "hold"  # as REPROBE, the verdict's row in AFTER_HOLD: the events are kept
    DROP_REJECTED = "drop_rejected"  # dead-letter the events named, resend the rest at once
    DEAD_LETTER = "dead_letter"
    HAND_BACK = "hand_back"  # back to the queue, unattempted, for a later read


@dataclass(frozen=True, slots=True)
class Fate:
    """A fate: the action, and what goes with it."""

    action: Action
    # Retry: the endpoint is down (5xx, network), not merely asking us to slow down (429).
    endpoint_down: bool = False
    # Acknowledge: the 200's count disagreed with the batch, which is news worth a counter.
    count_mismatch: bool = False
    # Dead-letter: under this reason instead of the outcome's own.
    reason: Reason | None = None
    # Dead-letter: whether the events were sent (a stale event never was).
    attempted: bool = True


FATES: Mapping[Reason | Outcome, Fate] = MappingProxyType(
    {
        Outcome.DELIVERED: Fate(Action.ACKNOWLEDGE),
        Outcome.ACCEPTED_MISMATCH: Fate(Action.ACKNOWLEDGE, count_mismatch=True),
        Outcome.STALE: Fate(Action.DEAD_LETTER, reason=Reason.OUTSIDE_TIME_WINDOW, attempted=False),
        Reason.MISSING_SCOPE: Fate(Action.REPROBE),
        Reason.UNAUTHORIZED: Fate(Action.REPROBE),
        Reason.ACCESS_DENIED: Fate(Action.REPROBE),
        Reason.UNKNOWN_PIXEL: Fate(Action.HOLD),
        Reason.NOT_FOUND: Fate(Action.HOLD),
        Reason.REQUEST_INVALID: Fate(Action.HOLD),
        Reason.INVALID_EVENT: Fate(Action.DROP_REJECTED),
        Reason.TOO_LARGE: Fate(Action.DROP_REJECTED),
        Reason.OUTSIDE_TIME_WINDOW: Fate(Action.DROP_REJECTED),
        Reason.RATE_LIMITED: Fate(Action.RETRY),
        Reason.SERVER_ERROR: Fate(Action.RETRY, endpoint_down=True),
        Reason.NETWORK: Fate(Action.RETRY, endpoint_down=True),
        Reason.RETRIES_EXHAUSTED: Fate(Action.DEAD_LETTER),
        Reason.UNEXPECTED: Fate(Action.DEAD_LETTER),
    }
)

# After a re-probe (Action.REPROBE): a confirmed failure is dead-lettered; the key guard has
# already held the destination, so every worker stops taking its events.
AFTER_PROBE: Mapping[Verdict, Fate] = MappingProxyType(
    {
        Verdict.TRANSIENT: Fate(Action.RETRY),
        Verdict.CONFIRMED: Fate(Action.DEAD_LETTER),
        Verdict.ALREADY_HELD: Fate(Action.HAND_BACK),
    }
)


# After a re-probe of a configuration problem (Action.HOLD): the events are not at fault,
# so a confirmed failure hands them back; the key guard holds the destination until a
# re-probe passes (the settings are fixed), and they go then.
AFTER_HOLD: Mapping[Verdict, Fate] = MappingProxyType(
    {
        Verdict.TRANSIENT: Fate(Action.RETRY),
        Verdict.CONFIRMED: Fate(Action.HAND_BACK),
        Verdict.ALREADY_HELD: Fate(Action.HAND_BACK),
    }
)


def fate(outcome: Reason | Outcome) -> Fate:
    """The fate of a batch after ``outcome``."""
    return FATES[outcome]


def delivered(accepted_events: int | None, sent: int) -> Outcome:
    """The outcome of a 200 that counted ``accepted_events`` (None: did not say) of ``sent``."""
    if accepted_events is not None and accepted_events != sent:
        return Outcome.ACCEPTED_MISMATCH
    return Outcome.DELIVERED


def stale_before_ms(now_ms: int) -> int:
    """Events that happened before this instant are outside the API's window (Outcome.STALE)."""
    return now_ms - API_MAX_AGE_MS + STALE_MARGIN_MS


class Attempted(Protocol):
    """What the retry plan needs of a queued event."""

    @property
    def attempts(self) -> int: ...

    @property
    def timestamp_ms(self) -> int: ...


E = TypeVar("E", bound=Attempted)


@dataclass(frozen=True, slots=True)
class RetryPlan(Generic[E]):
    """When a batch goes again, and which of its events may (the rest are exhausted)."""

    delay_s: float
    attempt: int
    due_ms: int
    again: list[E] = field(default_factory=list)
    exhausted: list[E] = field(default_factory=list)


def plan_retry(
    group: Sequence[E],
    *,
    now_ms: int,
    retry_after_s: float | None,
    base_s: float,
    cap_s: float,
    max_attempts: int | None,
    rand: Callable[[], float] = random.random,
) -> RetryPlan[E]:
    """The retry of ``group`` (Action.RETRY): the next attempt waits ``backoff_s``; an event
    whose next attempt would fall past its 7-day window, or past ``max_attempts`` when set,
    is exhausted (dead-lettered as ``retries_exhausted``)."""
    attempt = max(e.attempts for e in group) + 1
    delay = backoff_s(attempt, base_s=base_s, cap_s=cap_s, retry_after_s=retry_after_s, rand=rand)
    due = now_ms + ms(delay)

    def fits(e: E) -> bool:
        deadline = e.timestamp_ms + API_MAX_AGE_MS - STALE_MARGIN_MS
        return within_budget(
            e.attempts + 1, max_attempts, next_attempt_ms=due, deadline_ms=deadline
        )

    return RetryPlan(
        delay_s=delay,
        attempt=attempt,
        due_ms=due,
        again=[e for e in group if fits(e)],
        exhausted=[e for e in group if not fits(e)],
    )
