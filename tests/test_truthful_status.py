"""What capi reports stays true in trouble: the oldest event's age counts the retry schedule,
``capi enqueue --json`` prints its summary whatever the exit, and the intake is not ready
while Redis is full."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import orjson
import redis

from capi.sandbox import Fault, SandboxThread
from tests.helpers import capi, enqueue, events, make_settings, start_worker, stop_worker, wait_for
from tests.intake_helpers import start_intake
from tests.redisproc import RedisProcess


def test_the_oldest_age_counts_events_waiting_for_retry(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url)
    worker = start_worker(settings)
    try:
        with redis.Redis.from_url(redis_url) as c:
            wait_for(lambda: c.zcard(settings.keys.workers) > 0, 20, "worker started")
        sandbox.state.faults = [Fault("server_error", every=1, retry_after_s=120)]
        enqueue(settings, events(20))

        def status() -> dict[str, object]:
            result = capi(settings, "status", "--json", timeout=30)
            assert result.returncode == 0, result.stderr
            parsed: dict[str, object] = json.loads(result.stdout)
            return parsed

        seen: list[dict[str, object]] = []

        def all_waiting_for_retry() -> bool:  # the age is read from this same status
            seen[:] = [status()]
            s = seen[0]
            return s["queued"] == 0 and s["in_flight"] == 0 and s["retry_batches_scheduled"] != 0

        wait_for(all_waiting_for_retry, 30, "every event scheduled for retry")
        age = seen[0]["oldest_queued_age_s"]
    finally:
        stop_worker(worker)
    assert isinstance(age, float) and age > 0


def test_enqueue_json_prints_its_summary_when_redis_is_full(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    with RedisProcess(tmp_path) as server:
        settings = make_settings(sandbox, server.url)
        server.fill()
        lines = "".join(orjson.dumps(e).decode() + "\n" for e in events(3))
        result = capi(settings, "enqueue", "--json", input=lines)
    assert result.returncode == 6, result.stderr
    summary = json.loads(result.stdout)
    assert summary["lines"] == 3 and summary["queued"] == 0 and summary["refused"] == 0
    assert "full" in summary["error"]
    assert "full" in result.stderr


def test_the_intake_is_not_ready_while_redis_is_full(tmp_path: Path) -> None:
    with RedisProcess(tmp_path) as server:
        intake = start_intake(tmp_path, server.url)
        try:
            assert httpx.get(intake.url + "/readyz").status_code == 200
            server.fill()
            assert intake.post(events(1)).status_code == 503
            ready = httpx.get(intake.url + "/readyz")
            assert ready.status_code == 503
            assert "full" in ready.json()["reason"]
            server.unfill()
            assert httpx.get(intake.url + "/readyz").status_code == 200
        finally:
            intake.stop()
