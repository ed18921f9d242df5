"""Worker faults injected for real (issue 18's worker items): a frozen Redis and liveness,
answers lost in a Redis restart, outages close together, dead consumers after kill storms,
and a batch with many rejected events."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from capi.clock import LIVENESS_S
from capi.sandbox import Fault, SandboxThread
from capi.settings import Settings
from tests.conftest import free_port
from tests.helpers import enqueue, events, http_get, ids, make_settings, start_worker, wait_for
from tests.redisproc import RedisProcess

Start = Callable[[Settings], subprocess.Popen[str]]


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


@pytest.fixture
def workers() -> Iterator[Start]:
    """Starts ``capi worker`` processes; every one still running is killed at the end."""
    started: list[subprocess.Popen[str]] = []

    def start(settings: Settings) -> subprocess.Popen[str]:
        proc = start_worker(settings)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def stopped(proc: subprocess.Popen[str]) -> str:
    """SIGTERM a worker and return its output (it must exit 0)."""
    proc.terminate()
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    return output


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


def test_each_of_three_redis_outages_a_few_seconds_apart_is_logged(
    durable_redis: RedisProcess, sandbox: SandboxThread, workers: Start
) -> None:
    settings = make_settings(sandbox, durable_redis.url, redis_timeout_s=1.0)
    proc = workers(settings)
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
    output = stopped(proc)
    lines = output.splitlines()
    said = [line for line in lines if "ERROR" in line and "Redis cannot be reached" in line]
    assert len(said) == 3, output
    assert sum("recovered: Redis cannot be reached" in line for line in lines) == 3, output
