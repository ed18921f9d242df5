"""Worker faults injected for real (issue 18's worker items): a frozen Redis and liveness,
answers lost in a Redis restart, outages close together, dead consumers after kill storms,
and a batch with many rejected events."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from capi.clock import LIVENESS_S
from capi.sandbox import Fault, SandboxThread
from capi.settings import Settings
from tests.conftest import free_port
from tests.helpers import (
    capi,
    dead_letters,
    doom,
    drain,
    enqueue,
    events,
    http_get,
    ids,
    make_settings,
    start_worker,
    wait_for,
)
from tests.redisproc import RedisProcess


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis for one test, to break (no persistence)."""
    with RedisProcess(tmp_path) as server:
        yield server


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis for one test that keeps its data across a restart (AOF, fsync always)."""
    with RedisProcess(tmp_path, persist=True) as server:
        yield server


class Worker:
    """A ``capi worker`` process (its output in a file, read as it comes: ``LoggedProcess``)."""

    def __init__(self, settings: Settings) -> None:
        self.proc = start_worker(settings)

    def output(self) -> str:
        """Everything it printed so far."""
        return self.proc.output()

    def stop(self) -> str:
        """SIGTERM it; its whole output (it must exit 0)."""
        self.proc.terminate()
        output, _ = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, output
        return output

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


Start = Callable[[Settings], Worker]


@pytest.fixture
def workers() -> Iterator[Start]:
    """Starts ``capi worker`` processes; every one still running is killed at the end."""
    started: list[Worker] = []

    def start(settings: Settings) -> Worker:
        worker = Worker(settings)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


# -- liveness says whether the process is stuck, not whether Redis is ----------------------


def test_healthz_stays_up_while_redis_is_frozen_under_a_busy_worker(
    own_redis: RedisProcess, sandbox: SandboxThread, workers: Start
) -> None:
    settings = make_settings(sandbox, own_redis.url, batch_size=20, metrics_port=free_port())
    evts = events(3000)
    enqueue(settings, evts)
    sandbox.state.faults = [Fault("latency", every=1, latency_ms=50)]
    workers(settings)
    healthz = f"http://127.0.0.1:{settings.metrics_port}/healthz"
    wait_for(lambda: len(sandbox.state.delivered_ids()) >= 100, 30, "a busy worker")
    own_redis.freeze()
    answers: list[int] = []
    try:
        frozen = time.monotonic()
        # Sampled over more than twice the liveness window (and over CAPI_REDIS_TIMEOUT_S).
        while time.monotonic() - frozen < 2 * LIVENESS_S + 2:
            answers.append(http_get(healthz)[0])
            time.sleep(0.25)
    finally:
        own_redis.thaw()
    assert len(answers) > 10 and set(answers) == {200}, answers
    sandbox.state.faults = []
    wait_for(lambda: set(sandbox.state.delivered_ids()) == ids(evts), 90, "delivery after thaw")


# -- each outage gets its own line --------------------------------------------------------


def last_beat_ms(r: RedisProcess, settings: Settings) -> float:
    """The newest worker heartbeat in Redis (ms), 0 if none."""
    with r.client() as c:
        beats = c.zrange(settings.keys.workers, 0, -1, withscores=True)
    return max((score for _, score in beats), default=0.0)


@pytest.mark.slow  # three outages, each waited out: 30 s; run by `pytest -m slow` (and .ci/run)
def test_each_of_three_redis_outages_a_few_seconds_apart_is_logged(
    durable_redis: RedisProcess, sandbox: SandboxThread, workers: Start
) -> None:
    settings = make_settings(sandbox, durable_redis.url, redis_timeout_s=1.0)
    worker = workers(settings)
    enqueue(settings, events(10))
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 10, 30, "a started worker")
    for _ in range(3):
        durable_redis.kill()
        time.sleep(1.5)  # the outage itself: Redis is away this long
        durable_redis.start()
        back_ms = time.time() * 1000
        # The worker beats again, and keeps beating well past its retry backoff.
        until = back_ms + 8000
        wait_for(lambda t=until: last_beat_ms(durable_redis, settings) > t, 30, "8 s back")
    output = worker.stop()
    lines = output.splitlines()
    said = [line for line in lines if "ERROR" in line and "Redis cannot be reached" in line]
    assert len(said) == 3, output
    assert sum("recovered: Redis cannot be reached" in line for line in lines) == 3, output


# -- reads whose answer was lost are sent again promptly -----------------------------------


def test_reads_answered_into_a_frozen_redis_are_sent_again_long_before_claim_idle(
    own_redis: RedisProcess, sandbox: SandboxThread, workers: Start
) -> None:
    # A read sent to a frozen Redis times out; Redis runs it once thawed, and its answer
    # (entries now pending in this worker's consumer) goes nowhere. The lanes of a worker
    # sending to a fast endpoint spend much of their time reading: three freezes lose
    # some reads' answers (each freeze finds some lane mid-read).
    settings = make_settings(
        sandbox, own_redis.url, batch_size=5, claim_idle_s=120.0, redis_timeout_s=0.5
    )
    evts = events(20000)
    enqueue(settings, evts)
    workers(settings)
    for n in (500, 1500, 2500):
        wait_for(lambda n=n: len(sandbox.state.delivered_ids()) >= n, 60, "a busy worker")
        own_redis.freeze()
        try:
            time.sleep(1.0)  # the freeze itself: longer than CAPI_REDIS_TIMEOUT_S
        finally:
            own_redis.thaw()
    # Well within claim_idle (120 s): the worker takes its own lost entries back.
    wait_for(lambda: set(sandbox.state.delivered_ids()) == ids(evts), 60, "every event sent")


# -- a kill storm leaves no dead consumers behind ------------------------------------------


def test_a_replacement_worker_drops_the_consumers_of_killed_workers(
    own_redis: RedisProcess, sandbox: SandboxThread, workers: Start
) -> None:
    settings = make_settings(sandbox, own_redis.url, claim_idle_s=10.0)
    stream = settings.keys.stream
    for i in range(3):  # a kill storm: each worker read (so has consumers), then kill -9
        worker = workers(settings)
        enqueue(settings, events(20, start=20 * i))
        wait_for(lambda i=i: len(sandbox.state.delivered_ids()) == 20 * (i + 1), 30, "sent")
        worker.kill()
    with own_redis.client() as c:
        dead = {x["name"] for x in c.xinfo_consumers(stream, "senders")}
        assert len(dead) >= 2
        # Their heartbeats well past the liveness window (and their consumers idle as long).
        silent_ms = LIVENESS_S * 1000 + 3000  # a last read may follow the last beat
        wait_for(
            lambda: (
                not c.zrangebyscore(settings.keys.workers, time.time() * 1000 - silent_ms, "+inf")
            ),
            20,
            "the killed workers' heartbeats gone",
        )
        workers(settings)
        wait_for(  # at its start, or (a consumer still too young then) at the next run
            lambda: not dead & {x["name"] for x in c.xinfo_consumers(stream, "senders")},
            75,
            "the dead consumers dropped",
        )


# -- a batch with many rejected events ------------------------------------------------------


def test_every_rejected_event_named_in_one_answer_is_dropped_at_once_and_counted(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url, batch_size=500)
    evts = events(500)
    enqueue(settings, evts)
    doomed = doom(settings, positions=list(range(0, 500, 5)) + list(range(1, 500, 5))
                  + list(range(2, 500, 5)))  # fmt: skip
    assert len(doomed) == 300
    drain(settings)
    assert set(dead_letters(settings)) == set(doomed)
    assert set(sandbox.state.delivered_ids()) == ids(evts) - set(doomed)
    assert sandbox.state.requests <= 3  # not one request per rejected event
    result = capi(settings, "status", "--json")
    assert result.returncode == 0, result.stderr
    counters = json.loads(result.stdout)["counters"]
    assert counters["requests"] == sandbox.state.requests
    assert counters["dead_lettered"] == 300
