"""Trouble: each kind of error is logged once when it starts, reminded once a minute,
and its end is logged once; backoff grows and is capped. Time and randomness are mocked."""

from __future__ import annotations

import logging

import pytest
import redis.exceptions

from capi.trouble import BACKOFF_CAP_S, Trouble, classify


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (redis.exceptions.ConnectionError("Connection refused"), "unreachable"),
        (redis.exceptions.TimeoutError("Timeout reading"), "unreachable"),
        (redis.exceptions.OutOfMemoryError("command not allowed"), "full"),
        (
            redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
            "read-only",
        ),
        (redis.exceptions.ResponseError("NOGROUP No such key"), "lost-group"),
        (redis.exceptions.ResponseError("MISCONF Redis is configured to save"), "cannot-persist"),
        (redis.exceptions.NoPermissionError("this user has no permissions"), "no-permission"),
        (redis.exceptions.BusyLoadingError("Redis is loading"), "loading"),
        (redis.exceptions.ResponseError("WRONGTYPE Operation"), "redis-error"),
        (KeyError("bug"), "unexpected"),
    ],
)
def test_classify(exc: Exception, kind: str) -> None:
    assert classify(exc)[0] == kind


def test_logged_once_reminded_each_minute_and_recovery_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    trouble = Trouble(logging.getLogger("t"), monotonic=clock, rand=lambda: 1.0)
    caplog.set_level(logging.WARNING)
    oom = redis.exceptions.OutOfMemoryError("command not allowed")
    for _ in range(100):  # a hundred failures in a few seconds: one line
        trouble.failed(oom, "lane 0")
        clock.now += 0.05
    assert len(caplog.records) == 1 and "Redis is full" in caplog.records[0].getMessage()
    clock.now += 60
    trouble.failed(oom, "lane 0")
    assert len(caplog.records) == 2 and "for 65 s" in caplog.records[1].getMessage()
    trouble.ok()
    trouble.ok()
    assert len(caplog.records) == 3 and "recovered" in caplog.records[2].getMessage()
    for _ in range(20):  # flapping within the minute: no new lines
        clock.now += 0.1
        trouble.failed(oom, "gauges")
        clock.now += 0.1
        trouble.ok()
    assert len(caplog.records) == 3


def test_backoff_grows_and_is_capped() -> None:
    trouble = Trouble(logging.getLogger("t"), monotonic=Clock(), rand=lambda: 1.0)
    waits = [trouble.failed(redis.exceptions.ConnectionError("x"), "lane") for _ in range(12)]
    assert waits[0] < waits[1] < waits[2]
    assert max(waits) == BACKOFF_CAP_S
    trouble.ok()
    assert trouble.failed(redis.exceptions.ConnectionError("x"), "lane") == waits[0]


def test_each_outage_is_said_however_soon_after_the_last(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    trouble = Trouble(logging.getLogger("t"), monotonic=clock, rand=lambda: 1.0)
    caplog.set_level(logging.WARNING)
    away = redis.exceptions.ConnectionError("Connection refused")
    for _ in range(3):  # three restarts 12 s apart, each 2 s long
        for _ in range(10):
            trouble.failed(away, "lane 0")
            clock.now += 0.2
        trouble.ok()
        clock.now += 10
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot be reached" in m and "recovered" not in m for m in messages) == 3
    assert sum(m.startswith("recovered") for m in messages) == 3


def test_no_master_found_is_said_in_one_plain_sentence(caplog: pytest.LogCaptureFixture) -> None:
    """redis-py's "no master found" holds the repr of each sentinel client; cut at 200
    characters in ``capi status``'s worker line it showed a client's repr and never why
    (in the fault campaign, with every sentinel down: "No master found for 'capi-test' :
    <redis.asyncio.client.Redis(<redis.asyncio.connection.ConnectionPool(..."). It says
    how many sentinels did not answer, as the CLI does."""
    import asyncio

    import redis.asyncio.sentinel as aiosentinel

    from tests.conftest import free_port

    async def no_master() -> BaseException:
        sentinels = aiosentinel.Sentinel([("127.0.0.1", free_port())], socket_timeout=1)
        try:
            await sentinels.discover_master("capi-test")
        except aiosentinel.MasterNotFoundError as exc:
            return exc
        raise AssertionError("a master was found")

    exc = asyncio.run(no_master())
    trouble = Trouble(logging.getLogger("t"), monotonic=Clock(), rand=lambda: 1.0)
    with caplog.at_level(logging.ERROR):
        trouble.failed(exc, "reading the queue")
    said = "no master named 'capi-test' found: 1 of the sentinels did not answer"
    assert said in trouble.describe() and said in caplog.text, (trouble.describe(), caplog.text)
    assert "<redis" not in trouble.describe() + caplog.text


def test_an_answer_to_a_call_sent_before_the_failure_is_no_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Lanes share one Trouble: a call sent before Redis died may be answered after another
    lane's call failed. That answer says nothing of Redis now: in the fault campaign (kill -9
    of a Sentinel master) the worker logged "recovered ... (after 0.0 s); resuming" in the
    same millisecond as the outage, and nothing when Redis came back 1.7 s later."""
    clock = Clock()
    trouble = Trouble(logging.getLogger("t"), monotonic=clock, rand=lambda: 1.0)
    caplog.set_level(logging.WARNING)
    sent = trouble.now()
    clock.now += 0.01
    trouble.failed(redis.exceptions.ConnectionError("Connection refused"), "watching")
    trouble.ok(sent=sent)  # answered before the failure, seen after it
    assert not trouble.redis_ok
    assert [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()] == []
    clock.now += 1.7
    trouble.ok(sent=trouble.now())
    assert trouble.redis_ok
    assert "recovered" in caplog.records[-1].getMessage()
    assert "after 1.7 s" in caplog.records[-1].getMessage()
