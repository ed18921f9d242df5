"""The worker as a process: refuses a bad key, survives kill -9, stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from capi.sandbox import Fault, SandboxThread
from capi.sandbox.state import DEFAULT_SCOPELESS_KEY
from tests.conftest import free_port
from tests.helpers import (
    _plain,
    dead_letters,
    enqueue,
    events,
    ids,
    make_settings,
    spawn,
    stop_worker,
    wait_for,
)
from tests.helpers import start_worker as worker
from tests.redisproc import RedisProcess


def test_worker_with_a_wrong_key_does_not_start(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(
        sandbox, redis_url, api_key=DEFAULT_SCOPELESS_KEY, probe_confirmations=2
    )
    enqueue(settings, events(50))
    proc = worker(settings)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 10, output
    assert "lacks the scope ads.third_party_events.write" in output
    assert "Manage conversion keys" in output
    assert "did not start; queued events stay queued" in output
    assert DEFAULT_SCOPELESS_KEY not in output
    assert redis.Redis.from_url(redis_url).xlen(settings.keys.stream) == 50
    assert not sandbox.state.delivered_ids()


def test_kill_9_mid_batch_then_restart_delivers_everything(
    redis_url: str, sandbox: SandboxThread
) -> None:
    settings = make_settings(sandbox, redis_url, batch_size=100)
    evts = events(2000)
    enqueue(settings, evts)
    sandbox.state.faults = [Fault("latency", every=1, latency_ms=300)]
    proc = worker(settings)
    wait_for(lambda: sandbox.state.summary()["batches"] >= 2, what="first batches")
    proc.send_signal(signal.SIGKILL)  # mid-batch: requests are in flight
    proc.communicate(timeout=10)
    delivered_before = len(sandbox.state.delivered_ids())
    assert delivered_before < 2000
    sandbox.state.faults = []
    restarted = worker(settings, "--burst")
    output, _ = restarted.communicate(timeout=90)
    assert restarted.returncode == 0, output
    delivered = sandbox.state.delivered_ids()
    missing = ids(evts) - set(delivered)
    print(output)  # whole, under "Captured stdout" should the next line fail
    assert not missing, (len(missing), sorted(missing)[:10], output)  # at least once, every one
    assert "reclaimed" in output
    assert not dead_letters(settings)


def test_sigterm_stops_reading_and_loses_nothing(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, redis_url, batch_size=50, shutdown_timeout_s=0.2)
    evts = events(1000)
    enqueue(settings, evts)
    sandbox.state.faults = [Fault("latency", every=1, latency_ms=400)]
    proc = worker(settings)
    wait_for(lambda: sandbox.state.summary()["batches"] >= 1, what="first batch")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert time.monotonic() - started < 10
    assert proc.returncode == 0, output
    client = redis.Redis.from_url(redis_url)
    pending = client.xpending(settings.keys.stream, "senders")["pending"]
    assert pending == 0  # nothing stranded in a dead consumer: handed back or finished
    sandbox.state.faults = []
    rest = worker(settings, "--burst")
    rest.communicate(timeout=60)
    assert set(sandbox.state.delivered_ids()) == ids(evts)


def test_arq_entry_point_runs_the_sender(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, redis_url)
    evts = events(300)
    enqueue(settings, evts)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    env.update({f"CAPI_{k.upper()}": str(v) for k, v in _plain(settings).items()})
    env["CAPI_CONFIG_FILE"] = os.devnull
    proc = spawn(
        [sys.executable, "-m", "arq", "workers.main.WorkerSettings"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(lambda: set(sandbox.state.delivered_ids()) == ids(evts), what="arq-hosted delivery")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "sender starting" in output
    assert DEFAULT_SCOPELESS_KEY not in output and settings.api_key is not None
    assert settings.api_key.get_secret_value() not in output


def test_a_clean_burst_exit_says_so_without_alarm(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, redis_url)
    enqueue(settings, events(20))
    proc = worker(settings, "--burst")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "burst: nothing queued" in output
    assert "SIGUSR1" not in output and "ongoing to cancel" not in output


def ended(proc: subprocess.Popen[str], what: str) -> str:
    """A worker's whole output once it exits within 60 s; AssertionError saying ``what``
    (and its output so far) if it does not."""
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"{what} after 60 s; its output:\n{output}") from None
    return output


def test_a_burst_worker_gives_up_on_a_redis_nobody_listens_at(sandbox: SandboxThread) -> None:
    """A burst (drain and exit, from cron or a deploy step) does not wait for Redis forever:
    it gives up after CAPI_REDIS_TIMEOUT_S, saying where it looked, and exits 5 (REDIS)."""
    port = free_port()  # nothing listens there
    settings = make_settings(sandbox, f"redis://127.0.0.1:{port}/0", redis_timeout_s=1)
    proc = worker(settings, "--burst")
    output = ended(proc, "still waiting")
    assert proc.returncode == 5, output
    assert "Traceback" not in output
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"error: Redis at 127.0.0.1:{port} "), output
    assert "--burst gave up after 1 s" in last and "CAPI_REDIS_URL" in last
    assert "queued events stay queued" in last
    # The lines before it said "the worker keeps trying" (a burst gives up) and "Redis
    # does not answer" (nothing listens: the connection is refused).
    assert "keeps trying" not in output and "does not answer" not in output, output
    assert "--burst gives up once Redis is silent for CAPI_REDIS_TIMEOUT_S" in output, output


def test_a_burst_worker_giving_up_on_a_frozen_redis_names_every_cause(
    sandbox: SandboxThread, tmp_path: Path
) -> None:
    """A burst that gives up on a Redis frozen mid-drain (nothing answers; a timeout has
    no text) ended on "could not sign off (); status drops this worker ...": an empty
    cause, where the other lines name TimeoutError."""
    with RedisProcess(tmp_path) as rp:
        settings = make_settings(sandbox, rp.url, batch_size=20, redis_timeout_s=1)
        enqueue(settings, events(200))
        sandbox.state.faults = [Fault("latency", every=1, latency_ms=300)]
        proc = worker(settings, "--burst")
        wait_for(lambda: sandbox.state.summary()["batches"] >= 2, what="the first batches")
        rp.freeze()
        try:
            output, _ = proc.communicate(timeout=60)
        finally:
            rp.thaw()
    assert proc.returncode == 5, output
    assert "--burst gave up after 1 s" in output.strip().splitlines()[-1], output
    assert "could not sign off ()" not in output, output
    assert "could not sign off (TimeoutError)" in output, output


def test_a_burst_worker_refused_by_redis_says_so_not_that_redis_did_not_answer(
    sandbox: SandboxThread, tmp_path: Path
) -> None:
    """A wrong password: Redis answers every PING, refusing the credentials; the burst
    gave up saying Redis "could not be reached or did not answer" (and "has not answered
    for 1 s"), which sends an operator to the network, not to the password."""
    with RedisProcess(
        tmp_path, extra_args=["--requirepass", "right-pw"], password="right-pw"
    ) as rp:
        url = rp.url.replace("redis://", "redis://:wrong-pw@")
        proc = worker(make_settings(sandbox, url, redis_timeout_s=1), "--burst")
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 5, output
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"error: Redis at 127.0.0.1:{rp.port} refused every PING for 1 s: "), (
        output
    )
    assert "refused the credentials in CAPI_REDIS_URL" in last and "Check CAPI_REDIS_URL" in last
    said = [line for line in output.splitlines() if "burst" in line]
    assert said and not any("not answer" in line for line in said), output
    assert "wrong-pw" not in output, output


def test_a_burst_worker_gives_up_on_a_redis_that_freezes_while_it_drains(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    """A Redis that stops answering mid-drain (frozen: connections stay open, nothing
    answers, as behind a dead network path) ends a burst too: exit 5 while Redis is still
    frozen, naming it; once Redis is back, a worker delivers every event, none lost."""
    with RedisProcess(tmp_path) as server:
        settings = make_settings(sandbox, server.url, batch_size=20, redis_timeout_s=1)
        evts = events(400)
        enqueue(settings, evts)
        sandbox.state.faults = [Fault("latency", every=1, latency_ms=200)]
        proc = worker(settings, "--burst")
        wait_for(lambda: sandbox.state.summary()["batches"] >= 2, what="first batches")
        server.freeze()
        try:
            output = ended(proc, "still waiting on a frozen Redis")
        finally:
            server.thaw()
        assert proc.returncode == 5, output
        assert "Traceback" not in output
        last = output.strip().splitlines()[-1]
        assert last.startswith(f"error: Redis at 127.0.0.1:{server.port} "), output
        assert "--burst gave up after 1 s" in last
        sandbox.state.faults = []
        rest = worker(settings, "--burst")
        rest_output, _ = rest.communicate(timeout=90)
        assert rest.returncode == 0, rest_output
    assert ids(evts) <= set(sandbox.state.delivered_ids())


def test_arq_mode_prints_each_log_line_once(redis_url: str, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, redis_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    env.update({f"CAPI_{k.upper()}": str(v) for k, v in _plain(settings).items()})
    env["CAPI_CONFIG_FILE"] = os.devnull
    proc = spawn(
        [sys.executable, "-m", "arq", "workers.main.WorkerSettings"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = redis.Redis.from_url(redis_url)
    # Started: a heartbeat, which comes after the startup hook has logged "sender
    # starting" (the key state is written before that line: a SIGTERM in between ended the
    # startup hook before it could log, one run in many).
    wait_for(lambda: client.zcard(settings.keys.workers) == 1, what="startup")
    proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # seen once at load 20: say what it was doing
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"no exit within 30 s of SIGTERM; its output:\n{output}") from None
    assert proc.returncode == 0, output
    assert output.count("sender starting") == 1, output
    shutdown = [line for line in output.splitlines() if "shutdown on SIGTERM" in line]
    assert len(shutdown) == 1, output


def test_a_worker_whose_log_outgrows_a_pipe_keeps_delivering(
    redis_url: str, sandbox: SandboxThread
) -> None:
    """A line per one-event batch, ~150 KB in all: more than a pipe holds. The test helper
    gave the worker a pipe it read only at the end, and the worker stopped at ~450 events."""
    settings = make_settings(sandbox, redis_url, batch_size=1)
    enqueue(settings, events(1000))
    proc = worker(settings)
    wait_for(lambda: len(sandbox.state.delivered_ids()) == 1000, 60, "all 1000 delivered")
    # The sandbox counts a batch before the worker has read its answer and logged it.
    wait_for(lambda: proc.output().count("delivered 1 events") == 1000, 30, "1000 lines")
    assert len(proc.output()) > 128 * 1024
    assert proc.poll() is None
    assert "SIGTERM: stopping" in stop_worker(proc)
