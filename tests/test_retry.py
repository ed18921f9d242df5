from __future__ import annotations

from datetime import UTC, datetime

import pytest

from capi.failures import Reason
from capi.retry import backoff_s, parse_retry_after, should_retry

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("7", 7.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        ("soon", None),
        ("Mon, 23 Nov 2026 12:00:30 GMT", 30.0),
        ("Mon, 23 Nov 2026 11:59:00 GMT", 0.0),
        ("nan", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [
        (1, 0.0, 0.5),  # first retry: between base/2 and base
        (1, 1.0, 1.0),
        (2, 1.0, 2.0),
        (4, 1.0, 8.0),
        (10, 1.0, 60.0),  # capped
        (10, 0.0, 0.5),
        (200, 1.0, 60.0),  # no overflow
    ],
)
def test_backoff_is_exponential_jittered_and_capped(
    attempt: int, rand: float, expected: float
) -> None:
    assert backoff_s(attempt, base_s=1.0, cap_s=60.0, rand=lambda: rand) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("retry_after", "expected"), [(5.0, 5.0), (0.0, 0.0), (999.0, 999.0), (86_400.0, 86_400.0)]
)
def test_backoff_honours_retry_after_whatever_its_length(
    retry_after: float, expected: float
) -> None:
    assert backoff_s(3, base_s=1.0, cap_s=60.0, retry_after_s=retry_after) == expected


DEADLINE = 1_000_000


@pytest.mark.parametrize(
    ("reason", "attempts", "cap", "next_ms", "expected"),
    [
        (Reason.SERVER_ERROR, 1, None, 10, True),
        (Reason.NETWORK, 400, None, 10, True),  # no cap: attempts alone never exhaust
        (Reason.RATE_LIMITED, 5, 5, 10, False),  # an explicit cap still counts
        (Reason.SERVER_ERROR, 1, None, DEADLINE, False),  # the next try would be too late
        (Reason.SERVER_ERROR, 1, None, DEADLINE - 1, True),
        (Reason.INVALID_EVENT, 1, None, 10, False),
        (Reason.UNEXPECTED, 1, None, 10, False),
    ],
)
def test_should_retry_within_the_time_budget(
    reason: Reason, attempts: int, cap: int | None, next_ms: int, expected: bool
) -> None:
    assert (
        should_retry(reason, attempts, cap, next_attempt_ms=next_ms, deadline_ms=DEADLINE)
        is expected
    )
