"""The retry policy, as pure functions.

The budget is time, not attempts: an event that failed for a transient reason is sent
again as long as the next attempt still falls inside the API's 7-day window for it
(``within_budget``); an attempt cap exists only when ``CAPI_MAX_ATTEMPTS`` is set.
``should_retry`` says whether a failure may be retried at all, ``parse_retry_after`` reads
the server's wish, and ``backoff_s`` picks the wait: capped, jittered exponential backoff
that honours ``Retry-After`` (whatever its length). Randomness and the clock are parameters, so
the policy is tested table-driven.
"""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Callable
from datetime import UTC, datetime

from capi.failures import Reason


def within_budget(
    attempts: int, max_attempts: int | None, *, next_attempt_ms: int, deadline_ms: int
) -> bool:
    """Whether an event that has failed ``attempts`` sends may be sent again at
    ``next_attempt_ms``: before its ``deadline_ms``, and under the cap if there is one."""
    if max_attempts is not None and attempts >= max_attempts:
        return False
    return next_attempt_ms < deadline_ms


def should_retry(
    reason: Reason,
    attempts: int,
    max_attempts: int | None,
    *,
    next_attempt_ms: int,
    deadline_ms: int,
) -> bool:
    """Whether an event that failed for ``reason`` after ``attempts`` sends is sent again."""
    return reason.retryable and within_budget(
        attempts, max_attempts, next_attempt_ms=next_attempt_ms, deadline_ms=deadline_ms
    )


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def backoff_s(
    attempt: int,
    *,
    base_s: float,
    cap_s: float,
    retry_after_s: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """The wait before send number ``attempt + 1``, after ``attempt`` failed sends.

    With ``Retry-After`` the server's figure wins, whatever its length (the event's 7-day
    window is the only cap: the caller dead-letters what cannot wait that long; see
    :func:`within_budget`). Otherwise the wait is
    drawn uniformly from ``[base/2, min(cap, base * 2**(attempt-1))]`` ("equal jitter"): it
    grows exponentially, never exceeds the cap, and spreads retries of many workers apart.
    """
    if retry_after_s is not None:
        return max(retry_after_s, 0.0)
    exponent = min(max(attempt - 1, 0), 62)
    ceiling = min(cap_s, base_s * (2**exponent))
    floor = min(base_s / 2, ceiling)
    return float(floor + (ceiling - floor) * rand())
