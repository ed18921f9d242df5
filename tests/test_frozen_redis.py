"""A frozen Redis (SIGSTOP) costs each caller one CAPI_REDIS_TIMEOUT_S, however many call at
once: concurrent callers never queue behind each other's timeouts."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson

from capi.sandbox import SandboxThread
from tests.helpers import callers_behind_a_freeze, events, make_settings
from tests.intake_helpers import TOKEN, start_intake
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
    """Each answer is timed from its own request's start, on a connection opened before the
    freeze: timed from before the callers made their httpx clients and connections (the
    test's own work), answers were seen at 2.2 s on a machine at load 10."""
    with RedisProcess(tmp_path) as server:
        intake = start_intake(tmp_path, server.url, CAPI_REDIS_TIMEOUT_S=str(TIMEOUT_S))
        clients = [httpx.Client(base_url=intake.url, timeout=30) for _ in range(CALLERS + 1)]
        together = threading.Barrier(CALLERS + 1)
        try:
            assert intake.post(events(1)).status_code == 200
            assert all(c.get("/healthz").status_code == 200 for c in clients)  # connected
            server.freeze()

            def timed(i: int, request: httpx.Request) -> tuple[int, float]:
                together.wait()
                started = time.monotonic()
                status = clients[i].send(request).status_code
                return status, time.monotonic() - started

            posts = [
                clients[i].build_request(
                    "POST",
                    "/v1/events",
                    content=orjson.dumps({"events": events(1, start=10 + i)}),
                    headers={
                        "authorization": f"Bearer {TOKEN}",
                        "content-type": "application/json",
                    },
                )
                for i in range(CALLERS)
            ]
            with ThreadPoolExecutor(CALLERS + 1) as pool:
                futures = [pool.submit(timed, i, r) for i, r in enumerate(posts)]
                readiness = pool.submit(
                    timed, CALLERS, clients[CALLERS].build_request("GET", "/readyz")
                )
                answers = [f.result() for f in futures]
                ready_answer = readiness.result()
            server.thaw()
        finally:
            for client in clients:
                client.close()
            server.stop()
            intake.stop()
    assert [status for status, _ in answers] == [503] * CALLERS
    assert ready_answer[0] == 503
    late = [round(t, 1) for _, t in [*answers, ready_answer] if t > TIMEOUT_S + 1]
    assert not late, f"answers came after {late} s (timeout {TIMEOUT_S} s)"
