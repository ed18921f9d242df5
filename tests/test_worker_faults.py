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
