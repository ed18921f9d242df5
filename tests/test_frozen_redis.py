"""A frozen Redis (SIGSTOP) costs each caller one CAPI_REDIS_TIMEOUT_S, however many call at
once: concurrent callers never queue behind each other's timeouts."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from capi.sandbox import SandboxThread
from tests.helpers import callers_behind_a_freeze, events, make_settings
from tests.intake_helpers import start_intake
from tests.redisproc import RedisProcess

TIMEOUT_S = 1.0
CALLERS = 5


def test_concurrent_enqueues_against_a_frozen_redis_each_fail_within_the_timeout(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    with RedisProcess(tmp_path) as server:
        settings = make_settings(sandbox, server.url, redis_timeout_s=TIMEOUT_S)
        answers = callers_behind_a_freeze(settings, server.freeze, CALLERS)
    assert [outcome for outcome, _ in answers] == ["unavailable"] * CALLERS
    late = [round(t, 1) for _, t in answers if t > TIMEOUT_S + 1]
    assert not late, f"callers answered after {late} s (timeout {TIMEOUT_S} s)"


def test_concurrent_intake_requests_and_readyz_against_a_frozen_redis_are_each_bounded(
    tmp_path: Path,
) -> None:
    with RedisProcess(tmp_path) as server:
        intake = start_intake(tmp_path, server.url, CAPI_REDIS_TIMEOUT_S=str(TIMEOUT_S))
        try:
            assert intake.post(events(1)).status_code == 200
            server.freeze()
            started = time.monotonic()

            def post(i: int) -> tuple[int, float]:
                status = intake.post(events(1, start=10 + i)).status_code
                return status, time.monotonic() - started

            def ready() -> tuple[int, float]:
                status = httpx.get(intake.url + "/readyz", timeout=30).status_code
                return status, time.monotonic() - started

            with ThreadPoolExecutor(CALLERS + 1) as pool:
                posts = [pool.submit(post, i) for i in range(CALLERS)]
                readiness = pool.submit(ready)
                answers = [f.result() for f in posts]
                ready_answer = readiness.result()
            server.thaw()
        finally:
            server.stop()
            intake.stop()
    assert [status for status, _ in answers] == [503] * CALLERS
    assert ready_answer[0] == 503
    late = [round(t, 1) for _, t in [*answers, ready_answer] if t > TIMEOUT_S + 1]
    assert not late, f"answers came after {late} s (timeout {TIMEOUT_S} s)"
