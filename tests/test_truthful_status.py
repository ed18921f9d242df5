"""What capi reports stays true in trouble: the oldest event's age counts the retry schedule,
``capi enqueue --json`` prints its summary whatever the exit, and the intake is not ready
while Redis is full."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import orjson
import redis

from capi import clock
from capi.queue import Queue
from capi.sandbox import Fault, SandboxThread
from capi.status import destination_status, overview
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


def test_the_oldest_age_counts_from_the_first_enqueue_when_events_are_queued_again(
    redis_url: str, sandbox: SandboxThread
) -> None:
    """An event queued again with a new stream id (its retry come due, or handed back by a
    stopping worker) has waited since its first enqueue: capi status, capi destinations and
    the console (destination_status, overview) and the worker's gauge (Queue.depth) say so,
    not the time since it was queued again."""
    settings = make_settings(sandbox, redis_url)
    enqueue(settings, events(2))
    enqueued_by = clock.now_ms()
    time.sleep(1.5)  # the events wait before a worker reads them

    async def queue_again() -> None:  # as a worker would: a retry comes due, a hand-back
        client = settings.async_redis()
        queue = Queue(client, settings.keys)
        await queue.ensure_group()
        [retried, handed] = await queue.read("w:0", 2)
        await queue.schedule_retry([retried], 1, {"reason": "server_error"}, clock.now_ms())
        assert await queue.move_due_retries(clock.now_ms()) == 1
        await queue.hand_back([handed])
        await client.aclose()

    async def deliver_the_retried() -> None:
        client = settings.async_redis()
        queue = Queue(client, settings.keys)
        entries = await queue.read("w:0", 2)
        await queue.deliver([e for e in entries if e.attempts], clock.now_ms())
        await queue.hand_back([e for e in entries if not e.attempts])
        await client.aclose()

    async def ages() -> list[float]:
        client = settings.async_redis()
        try:
            status = await destination_status(client, settings.keys)
            row = (await overview(client, settings.keys, ["default"]))["default"]
            oldest = (await Queue(client, settings.keys).depth())[2]
            assert oldest is not None
            depth = (clock.now_ms() - oldest) / 1000
            return [status["oldest_queued_age_s"], row["oldest_queued_age_s"], depth]
        finally:
            await client.aclose()

    def waited() -> float:  # at least this long since the first enqueue
        return (clock.now_ms() - enqueued_by) / 1000

    asyncio.run(queue_again())
    least = waited()
    assert all(age >= least for age in asyncio.run(ages())), (least, asyncio.run(ages()))
    asyncio.run(deliver_the_retried())  # the handed-back event alone, never sent
    least = waited()
    assert all(age >= least for age in asyncio.run(ages())), (least, asyncio.run(ages()))


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
