"""The pipeline end to end: real Redis, the sandbox over HTTP, a burst sender in-process."""

from __future__ import annotations

import asyncio
import threading
import time

import redis

from capi.failures import Reason
from capi.sandbox import Fault, SandboxThread
from capi.sandbox.state import DEFAULT_KEY
from capi.worker.lanes import run_sender
from capi.worker.sender import Sender
from tests.helpers import (
    dead_letters,
    doom,
    drain,
    enqueue,
    events,
    ids,
    make_settings,
    redis_dump,
    wait_for,
)


def test_thousands_delivered_exactly_once_in_batches(
    redis_url: str, sandbox: SandboxThread
) -> None:
    # No faults: exactly once, however slowly a loaded machine answers (a 1.5 s timeout
    # resends a batch the sandbox took longer to answer, and delivers it twice).
    settings = make_settings(
        sandbox, redis_url, batch_size=500, request_timeout_s=30.0, claim_idle_s=60.0
    )
    evts = events(4000)
    enqueue(settings, evts)
    drain(settings)
    delivered = sandbox.state.delivered_ids()
    assert set(delivered) == ids(evts)
    assert set(delivered.values()) == {1}
    summary = sandbox.state.summary()
    assert summary["batches"] <= 12  # 4000 events, batches of up to 500
    assert summary["max_batch"] == 500
    assert not dead_letters(settings)


def test_transient_faults_lose_nothing_and_dead_letter_nothing(
    redis_url: str, sandbox: SandboxThread
) -> None:
    sandbox.state.faults = [
        Fault("missing_scope", every=7),
        Fault("rbac", every=11),
        Fault("rate_limit", every=13, retry_after_s=0.01),
        Fault("server_error", every=17, status=503),
        Fault("drop", every=19),
    ]
    # The faults hit the key guard's probes too: about one request in five answers a key
    # problem, so three probes in a row (the default) would confirm a "broken" key by
    # chance in about one episode in a hundred; five make that one in 2,000.
    settings = make_settings(
        sandbox, redis_url, batch_size=50, max_attempts=20, probe_confirmations=5
    )
    evts = events(3000)
    enqueue(settings, evts)
    drain(settings)
    delivered = sandbox.state.delivered_ids()
    assert set(delivered) == ids(evts)
    assert not dead_letters(settings)
    statuses = sandbox.state.summary()["statuses"]
    for status in ("401", "403", "429", "503", "0"):  # every fault really happened
        assert int(statuses.get(status, 0)) > 0, statuses
    counters = redis.Redis.from_url(redis_url).hgetall(settings.keys.stats)
    assert int(counters[b"transient_key_failures"]) > 0  # counted, visible to operators


def test_one_rejected_event_is_dead_lettered_alone(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, redis_url, batch_size=500)
    evts = events(400)
    enqueue(settings, evts)
    # The API (sandbox) rejects this one at events[i].
    [doomed_id] = doom(settings, positions=[123])
    drain(settings)
    dls = dead_letters(settings)
    assert list(dls) == [doomed_id]
    record = dls[doomed_id]
    assert record["reason"] == "invalid_event"
    assert record["status"] == 400
    assert record["error_body"]["error"]["errors"][0]["code"] == "unknown_data_field"
    assert "coupon" in record["guidance"]
    assert record["request_ids"]["x-request-id"].startswith("req_sbx_")
    assert record["event"]["data"]["coupon"] == "DOOMED"
    assert set(sandbox.state.delivered_ids()) == ids(evts) - {doomed_id}
    assert sandbox.state.requests <= 4  # probe + 2 tries of the batch, not one per event


def test_without_an_index_the_batch_is_bisected(redis_url: str, sandbox: SandboxThread) -> None:
    sandbox.state.report_index = False
    settings = make_settings(sandbox, redis_url, batch_size=256)
    evts = events(256)
    enqueue(settings, evts)
    doomed = doom(settings, positions=[40, 200])
    drain(settings)
    assert set(dead_letters(settings)) == set(doomed)
    assert set(sandbox.state.delivered_ids()) == ids(evts) - set(doomed)
    assert sandbox.state.requests < 40  # bisection: ~2 log2(256) per bad event, not 256


def test_events_past_the_window_are_caught_before_sending(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url)
    evts = events(20)
    enqueue(settings, evts)
    eight_days_later = time.time() + 8 * 86_400
    drain(settings, clock=lambda: eight_days_later)
    dls = dead_letters(settings)
    assert set(dls) == ids(evts)
    assert {d["reason"] for d in dls.values()} == {"outside_time_window"}
    assert not any(d["replayable"] for d in dls.values())
    assert sandbox.state.summary()["batches"] == 0  # nothing sent that would be refused


def test_retries_exhausted_after_max_attempts(redis_url: str, sandbox: SandboxThread) -> None:
    sandbox.state.faults = [Fault("server_error", every=1, status=502)]
    settings = make_settings(sandbox, redis_url, max_attempts=4)
    enqueue(settings, events(5))
    # The startup check happens in the worker; here the sender runs directly.
    drain(settings)
    dls = dead_letters(settings)
    assert len(dls) == 5
    for record in dls.values():
        assert record["reason"] == Reason.RETRIES_EXHAUSTED
        assert record["attempts"] == 4
        assert record["status"] == 502
        assert record["first_attempt_at"] < record["last_attempt_at"]
    assert sandbox.state.requests == 4


def test_key_losing_its_scope_mid_run_holds_the_queue(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url, batch_size=100, batch_wait_ms=0, concurrency=1)
    first, later = events(300), events(700, start=300)
    enqueue(settings, first)
    stop = threading.Event()
    result: dict[str, Sender] = {}

    def run() -> None:
        async def go() -> None:
            sender = Sender.from_settings(settings)
            result["sender"] = sender
            task = asyncio.create_task(run_sender(sender))
            await asyncio.to_thread(stop.wait)
            sender.stop()
            await task
            await sender.aclose()

        asyncio.run(go())

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(lambda: len(sandbox.state.delivered_ids()) == 300, what="first delivery")
        sandbox.state.conversion_keys.discard(DEFAULT_KEY)
        sandbox.state.scopeless_keys.add(DEFAULT_KEY)  # the key loses its scope
        enqueue(settings, later)
        client = redis.Redis.from_url(redis_url)
        wait_for(lambda: client.hget(settings.keys.key_state, "state") == b"held", what="hold")
        wait_for(lambda: bool(dead_letters(settings)), what="the batch that met the broken key")
        dls = dead_letters(settings)
        assert dls, "the batch that met the broken key is dead-lettered"
        assert len(dls) <= 100
        record = next(iter(dls.values()))
        assert record["reason"] == "missing_scope"
        assert "Conversion Key" in record["guidance"]
        assert DEFAULT_KEY not in record["guidance"]
        assert client.xlen(settings.keys.stream) > 0  # the rest waits in the queue
        assert len(sandbox.state.delivered_ids()) == 300
        sandbox.state.scopeless_keys.discard(DEFAULT_KEY)
        sandbox.state.conversion_keys.add(DEFAULT_KEY)  # fixed: a re-probe passes
        wait_for(
            lambda: len(sandbox.state.delivered_ids()) + len(dls) == 1000, what="resume after fix"
        )
    finally:
        stop.set()
        thread.join(20)
    assert not thread.is_alive(), "the sender did not stop"
    delivered = sandbox.state.delivered_ids()
    assert set(delivered) | set(dls) == ids(first) | ids(later)  # none lost
    assert not set(delivered) & set(dls)
    assert client.hget(settings.keys.key_state, "state") == b"ok"


def test_no_key_or_raw_pii_in_redis_after_failures(redis_url: str, sandbox: SandboxThread) -> None:
    sandbox.state.faults = [Fault("missing_scope", every=3), Fault("drop", every=5)]
    settings = make_settings(sandbox, redis_url, max_attempts=2, batch_size=10)
    enqueue(settings, events(100))
    drain(settings)
    dump = redis_dump(redis_url)
    assert DEFAULT_KEY.encode() not in dump
    assert b"@example.com" not in dump
