"""How a worker reads the endpoint's answers: a real ``capi worker`` process, a real Redis,
and an imitation of the endpoint on loopback (a stdlib HTTP server whose answers each test
scripts), as in the outside API review that found these misreadings."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from capi.settings import Settings
from tests.endpoint_helpers import (
    OK,
    Answer,
    Endpoint,
    Request,
    endpoint,
    json_error,
    key_state,
    settings_for,
    worker,
)
from tests.helpers import dead_letters, enqueue, events
from tests.helpers import wait_for as wait

__all__ = ["endpoint", "worker"]  # fixtures


def test_a_400_naming_an_event_is_its_rejection_whatever_the_message_says(
    endpoint: Endpoint, redis_url: str, worker: Callable[[Settings], None]
) -> None:
    def answer(r: Request) -> Answer:
        bad = [i for i, event_id in enumerate(r.ids) if "bad" in event_id]
        if r.validate_only or not bad:
            return OK
        return 400, {}, json_error("RBAC: access denied", param=f"events[{bad[0]}]")

    endpoint.answer = answer
    settings = settings_for(endpoint, redis_url, batch_size=3)
    batch = events(3)
    batch[1]["id"] = "the-bad-one"
    enqueue(settings, batch)
    worker(settings)
    wait(lambda: len(endpoint.delivered) == 2 and dead_letters(settings), what="fates")
    letters = dead_letters(settings)
    assert list(letters) == ["the-bad-one"]
    assert letters["the-bad-one"]["reason"] == "invalid_event"
    assert len(endpoint.sends()) == 2  # the batch, then its two good events at once


def test_a_413_splits_the_batch(
    endpoint: Endpoint, redis_url: str, worker: Callable[[Settings], None]
) -> None:
    endpoint.answer = lambda r: (
        (413, {}, b"<html>413 Request Entity Too Large</html>") if len(r.ids) > 3 else OK
    )
    settings = settings_for(endpoint, redis_url, batch_size=8)
    enqueue(settings, events(8))
    worker(settings)
    wait(lambda: len(endpoint.delivered) == 8, what="every event delivered")
    assert dead_letters(settings) == {}


@pytest.mark.parametrize(
    ("status", "reply", "reason"),
    [
        (404, b"<html>404 Not Found</html>", "not_found"),
        (403, json_error("403: unknown pid"), "unknown_pixel"),
        (400, json_error("Invalid value", param="pid"), "request_invalid"),
    ],
)
def test_a_configuration_failure_mid_run_holds_the_destination_and_keeps_the_events(
    endpoint: Endpoint,
    redis_url: str,
    worker: Callable[[Settings], None],
    status: int,
    reply: bytes,
    reason: str,
) -> None:
    settings = settings_for(endpoint, redis_url, batch_size=2, reprobe_interval_s=30)
    enqueue(settings, events(2, prefix="before-"))
    worker(settings)
    wait(lambda: len(endpoint.delivered) == 2, what="the first events delivered")
    endpoint.answer = lambda r: (status, {}, reply)  # the pixel or URL goes wrong mid-run
    sent_before = len(endpoint.requests)
    enqueue(settings, events(6, prefix="after-"))
    wait(lambda: key_state(settings).get("state") == "held", what="the hold")
    state = key_state(settings)
    assert state["reason"] == reason
    if reason == "request_invalid":
        assert "'pid'" in state["guidance"]  # diagnosed once, naming the field
    # Each batch sent once (three of two events, on parallel lanes), never split or sent
    # again; bisecting a request-level 400 sent 2n-1 requests.
    after = [r for r in endpoint.requests[sent_before:] if not r.validate_only]
    sent_ids = [i for r in after for i in r.ids]
    assert len(sent_ids) == len(set(sent_ids)) and all(len(r.ids) == 2 for r in after)
    assert dead_letters(settings) == {}  # the events wait for the fix
    endpoint.answer = lambda r: OK  # fixed: the re-probe passes and they go
    with redis.Redis.from_url(redis_url) as client:  # re-probe now, not in 30 s
        client.delete(settings.keys.for_destination("default").probe_lock)
    wait(lambda: len(endpoint.delivered) == 8, timeout_s=60, what="the rest delivered")


def test_a_long_retry_after_is_honoured(
    endpoint: Endpoint, redis_url: str, worker: Callable[[Settings], None]
) -> None:
    endpoint.answer = lambda r: OK if r.validate_only else (429, {"Retry-After": "3600"}, b"")
    settings = settings_for(endpoint, redis_url, retry_cap_s=1.0)
    enqueue(settings, events(1))
    started_ms = time.time() * 1000
    worker(settings)
    retry_key = settings.keys.for_destination("default").retry
    with redis.Redis.from_url(redis_url) as client:
        wait(lambda: client.zcard(retry_key) == 1, what="the retry scheduled")
        ((_, due_ms),) = client.zrange(retry_key, 0, -1, withscores=True)
    assert due_ms - started_ms > 3500 * 1000  # the server's hour, not CAPI_RETRY_CAP_S
    assert len(endpoint.sends()) == 1


def test_each_event_a_rejection_names_gets_the_reason_of_its_own_errors(
    endpoint: Endpoint, redis_url: str, worker: Callable[[Settings], None]
) -> None:
    # One answer naming two events, each with its own code: only the event whose own error
    # says "too old" is outside the time window (never replayable); the other is an
    # ordinary, replayable rejection (contract, section 6).
    def answer(r: Request) -> Answer:
        if r.validate_only or len(r.ids) == 1:
            return OK
        bad, old = r.ids.index("bad-data"), r.ids.index("too-old")
        return (
            400,
            {},
            json_error(
                f"Invalid event at events[{bad}]. See errors for details.",
                param=f"events[{bad}]",
                code="invalid_event",
                errors=[
                    {
                        "message": "data.type is required",
                        "param": f"events[{bad}].data.type",
                        "code": "missing_event_data_type",
                    },
                    {
                        "message": "older than 7 days",
                        "param": f"events[{old}].timestamp_ms",
                        "code": "event_timestamp_too_old",
                    },
                ],
            ),
        )

    endpoint.answer = answer
    settings = settings_for(endpoint, redis_url, batch_size=3)
    batch = events(3)
    batch[1]["id"], batch[2]["id"] = "bad-data", "too-old"
    enqueue(settings, batch)
    worker(settings)
    wait(lambda: endpoint.delivered and len(dead_letters(settings)) == 2, what="fates")
    letters = dead_letters(settings)
    assert letters["bad-data"]["reason"] == "invalid_event"
    assert letters["bad-data"]["replayable"] is True
    assert "missing_event_data_type" in str(letters["bad-data"]["error_body"])
    assert "missing_event_data_type" not in str(letters["too-old"]["error_body"])
    assert letters["too-old"]["reason"] == "outside_time_window"
    assert letters["too-old"]["replayable"] is False
    assert endpoint.delivered == [batch[0]["id"]]


def test_an_event_said_too_old_only_in_an_errors_entry_without_a_param_stays_too_old(
    endpoint: Endpoint, redis_url: str, worker: Callable[[Settings], None]
) -> None:
    # The answer names events[1] in its param and says why in an errors[] entry that names
    # no event: the event is too old (not replayable), as the answer as a whole says. Its
    # dead letter said invalid_event (replayable: a replay that could only fail again).
    def answer(r: Request) -> Answer:
        if r.validate_only or "old" not in r.ids:
            return OK
        old = r.ids.index("old")
        errors = [{"message": "older than 7 days", "code": "event_timestamp_too_old"}]
        body = json_error("m", param=f"events[{old}]", code="invalid_event", errors=errors)
        return 400, {}, body

    endpoint.answer = answer
    settings = settings_for(endpoint, redis_url, batch_size=3)
    batch = events(3)
    batch[1]["id"] = "old"
    enqueue(settings, batch)
    worker(settings)
    wait(lambda: len(endpoint.delivered) == 2 and dead_letters(settings), what="fates")
    letter = dead_letters(settings)["old"]
    assert (letter["reason"], letter["replayable"]) == ("outside_time_window", False), letter


def test_an_event_with_errors_of_its_own_is_not_too_old_by_the_answers_top_code(
    endpoint: Endpoint, redis_url: str, worker: Callable[[Settings], None]
) -> None:
    # An answer whose own code says "too old" and whose param names no event, listing one
    # event too old and another with a bad data field: the second is an ordinary,
    # replayable rejection (its own errors say so); it was dead-lettered as too old.
    def answer(r: Request) -> Answer:
        if r.validate_only or len(r.ids) == 1:
            return OK
        bad, old = r.ids.index("bad-data"), r.ids.index("too-old")
        errors = [
            {
                "message": "old",
                "param": f"events[{old}].timestamp_ms",
                "code": "event_timestamp_too_old",
            },
            {
                "message": "unknown",
                "param": f"events[{bad}].data.foo",
                "code": "unknown_data_field",
            },
        ]
        return 422, {}, json_error("m", param=None, code="event_timestamp_too_old", errors=errors)

    endpoint.answer = answer
    settings = settings_for(endpoint, redis_url, batch_size=3)
    batch = events(3)
    batch[1]["id"], batch[2]["id"] = "bad-data", "too-old"
    enqueue(settings, batch)
    worker(settings)
    wait(lambda: endpoint.delivered and len(dead_letters(settings)) == 2, what="fates")
    letters = dead_letters(settings)
    assert letters["too-old"]["reason"] == "outside_time_window"
    assert (letters["bad-data"]["reason"], letters["bad-data"]["replayable"]) == (
        "invalid_event",
        True,
    ), letters["bad-data"]
