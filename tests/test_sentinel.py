"""Redis Sentinel for real (tests/sentinelproc.py): clients given only the sentinels (the
CLI, producers, arq's pool), a frozen master, a switchover, bad settings. The failover
under load is tests/test_sentinel_failover.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio

from capi.errors import ConfigError, QueueUnavailable
from capi.exitcodes import ExitCode
from capi.producer import Producer, SyncProducer
from capi.sandbox import SandboxThread
from capi.sandbox.state import DEFAULT_KEY, DEFAULT_PIXEL
from capi.settings import Settings
from tests.helpers import callers_behind_a_freeze, capi, events, wait_for
from tests.sentinelproc import MASTER_NAME, SentinelSet, sentinel_settings


def test_only_the_sentinels_are_enough_for_capi_status_and_enqueue(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    with SentinelSet(tmp_path / "s", password="sentinel-test-pw", replicas=1) as found:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
        env.update(
            CAPI_CONFIG_FILE=os.devnull,
            CAPI_REDIS_URL="redis://:sentinel-test-pw@unused.invalid/2",  # password and db only
            CAPI_REDIS_SENTINELS=found.addresses,
            CAPI_REDIS_SENTINEL_MASTER=MASTER_NAME,
            CAPI_API_KEY=DEFAULT_KEY,
            CAPI_PIXEL_ID=DEFAULT_PIXEL,
            CAPI_BASE_URL=sandbox.url,
        )
        batch = b"\n".join(orjson.dumps(e) for e in events(5, prefix="cli-")).decode()

        def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "workers.cli", *args],
                env=env,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        enqueued = run("enqueue", "--json", "-", stdin=batch)
        assert enqueued.returncode == 0, enqueued.stderr
        status = run("status", "--json")
        assert status.returncode == 0, status.stderr
        with found.master.client(db=2) as master:
            assert master.xlen("capi:events") == 5  # the URL's password and db
        assert orjson.loads(enqueued.stdout)["queued"] == 5
        assert orjson.loads(status.stdout)["queued"] == 5
        assert "CAPI_REDIS_URL is not set" not in status.stderr


def test_sentinel_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"CAPI_REDIS_SENTINELS.*host:port"):
        Settings.load(redis_sentinels="10.0.0.5", redis_sentinel_master="m")
    with pytest.raises(ConfigError, match="go together"):
        Settings.load(redis_sentinels="10.0.0.5:26379")
    with pytest.raises(ConfigError, match="port from 1 to 65535"):
        Settings.load(redis_sentinels="a:26379,b:0", redis_sentinel_master="m")
    ok = Settings.load(redis_sentinels=" a:26379 , [::1]:26380", redis_sentinel_master="m")
    assert ok.sentinels is not None
    assert ok.sentinels.addresses == (("a", 26379), ("::1", 26380))


FROZEN_TIMEOUT_S = 1.0
CALLERS = 5


def test_a_frozen_master_costs_each_concurrent_caller_one_timeout(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    # Sentinels that would wait a minute before a failover: the master stays the frozen one.
    with SentinelSet(tmp_path / "s", down_after_ms=60_000, replicas=1) as found:
        settings = sentinel_settings(sandbox, found, redis_timeout_s=FROZEN_TIMEOUT_S)
        answers = callers_behind_a_freeze(settings, found.master.freeze, CALLERS)
    assert [outcome for outcome, _ in answers] == ["unavailable"] * CALLERS
    late = [round(t, 1) for _, t in answers if t > FROZEN_TIMEOUT_S + 0.8]
    assert not late, f"callers answered after {late} s (timeout {FROZEN_TIMEOUT_S} s)"


def test_a_demoted_master_is_never_written_to(tmp_path: Path, sandbox: SandboxThread) -> None:
    """A switchover (SENTINEL FAILOVER) turns the master into a replica while producers (async
    and sync) have connections to it: their next writes go to the new master, every one
    accepted (the
    default durability: right after a switchover the demoted master is still syncing, so
    ``replica`` would answer QueueUnavailable for a while, which is right but not tested
    here)."""
    with SentinelSet(tmp_path / "s", replicas=1) as found:
        settings = sentinel_settings(sandbox, found)
        old = found.master

        async def go() -> None:
            async with Producer.from_settings(settings) as producer:
                with SyncProducer.from_settings(settings) as sync_producer:
                    assert await producer.enqueue(events(1)[0])
                    assert sync_producer.enqueue(events(1, start=1)[0])
                    found.wait_replicated()  # else the switchover loses them (memory durability)
                    with found.sentinel(found.sentinel_ports[0]) as s:
                        s.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
                    wait_for(lambda: found.promoted(old.port), 30, "switchover")
                    wait_for(lambda: found.demoted(old), 30, "demotion")  # a replica now
                    for event in events(20, start=2):
                        assert await producer.enqueue(event)
                    assert sync_producer.enqueue_many(events(20, start=22)).queued == 20

        asyncio.run(asyncio.wait_for(go(), 90))
        new = next(r for r in found.replicas if r.port == found.master_port())
        with new.client() as c:
            assert c.xlen("capi:events") == 42


def test_after_a_switchover_writes_go_to_the_new_master_before_the_old_one_is_demoted(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    """After SENTINEL FAILOVER the old master stays a writable master until a sentinel
    reconfigures it (about 10 s: its INFO period), and writes that land there are lost when
    it resyncs from the new one. Producers (async and sync) whose pooled connections were
    opened to it follow the sentinels: once every sentinel names the new master, their next
    writes go there, not to the old master (the fault campaign saw workers, the intake and
    producers keep writing to the old master until its demotion: deliveries recorded there
    were repeated, acknowledged events lost, and ``capi status`` showed no live worker)."""
    with SentinelSet(tmp_path / "s", replicas=1) as found:
        settings = sentinel_settings(sandbox, found)
        old = found.master
        new = found.replicas[0]

        def all_name_the_new_master() -> bool:
            seen = [found.master_seen(port) for port in found.sentinel_ports]
            return all(s is not None and int(str(s["port"])) == new.port for s in seen)

        async def go() -> None:
            async with Producer.from_settings(settings) as producer:
                with SyncProducer.from_settings(settings) as sync_producer:
                    assert await producer.enqueue(events(1)[0])
                    assert sync_producer.enqueue(events(1, start=1)[0])
                    found.wait_replicated()
                    with found.sentinel(found.sentinel_ports[0]) as s:
                        s.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
                    wait_for(all_name_the_new_master, 30, "every sentinel to name the new master")
                    await asyncio.sleep(1.5)  # the pools' next look at the sentinels
                    assert await producer.enqueue(events(1, start=2)[0])
                    assert sync_producer.enqueue(events(1, start=3)[0])
                    # The old master was still a master meanwhile: a write was possible there.
                    assert not found.demoted(old), "demoted early: the test proved nothing"

        asyncio.run(asyncio.wait_for(go(), 90))
        with new.client() as c:
            assert c.xlen("capi:events") == 4


def test_silent_sentinels_do_not_stall_calls_to_a_master_that_answers(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    """The pools' look at the sentinels every MASTER_CHECK_S does not hold up the call
    that takes a connection for longer than MASTER_CHECK_WAIT_S: with every sentinel
    frozen (their hosts lost, say) and the master answering, an enqueue waited for each
    sentinel's CAPI_REDIS_TIMEOUT_S in turn (3 x 2 s here, 3 x 5 s by default), once a
    second, where it took milliseconds before the pools looked again."""
    with SentinelSet(tmp_path / "s", replicas=1) as found:
        settings = sentinel_settings(sandbox, found, redis_timeout_s=2.0)
        worst = {"async": 0.0, "sync": 0.0}

        async def go() -> None:
            async with Producer.from_settings(settings) as producer:
                with SyncProducer.from_settings(settings) as sync_producer:
                    assert await producer.enqueue(events(1)[0])
                    assert sync_producer.enqueue(events(1, start=1)[0])
                    for proc in found.sentinel_procs:
                        os.kill(proc.pid, signal.SIGSTOP)
                    try:
                        until = time.monotonic() + 2.5  # two looks due, at least
                        i = 2
                        while time.monotonic() < until:
                            t = time.monotonic()
                            assert await producer.enqueue(events(1, start=i)[0])
                            worst["async"] = max(worst["async"], time.monotonic() - t)
                            t = time.monotonic()
                            assert sync_producer.enqueue(events(1, start=i + 1)[0])
                            worst["sync"] = max(worst["sync"], time.monotonic() - t)
                            i += 2
                            await asyncio.sleep(0.05)
                    finally:
                        for proc in found.sentinel_procs:
                            os.kill(proc.pid, signal.SIGCONT)

        asyncio.run(asyncio.wait_for(go(), 60))
        assert worst["async"] < 1.5 and worst["sync"] < 1.5, worst


def test_arqs_pool_finds_the_master_through_the_sentinels(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    from workers.main import worker_settings

    with SentinelSet(tmp_path / "s", replicas=1) as found:
        pool = worker_settings(sentinel_settings(sandbox, found))["redis_pool"]

        async def go() -> None:
            await pool.set("capi:arq-probe", "1")
            await pool.aclose(close_connection_pool=True)  # as arq closes it

        asyncio.run(go())
        with found.master.client() as c:
            assert c.get("capi:arq-probe") == b"1"


def test_the_urls_password_tls_and_database_reach_the_master_connections() -> None:
    settings = Settings.load(
        redis_url="rediss://:pw@unused.invalid:6380/3?ssl_ca_certs=/etc/ca.pem",
        redis_sentinels="127.0.0.1:26379",
        redis_sentinel_master="m",
    )
    for client, tls in (
        (settings.sync_redis(), redis.SSLConnection),
        (settings.async_redis(), redis.asyncio.SSLConnection),
    ):
        pool = client.connection_pool
        assert issubclass(pool.connection_class, tls)
        kwargs = pool.connection_kwargs
        assert (kwargs["password"], kwargs["db"]) == ("pw", 3)
        assert (kwargs["ssl_ca_certs"], kwargs["ssl_cert_reqs"]) == ("/etc/ca.pem", "required")
        assert "host" not in kwargs  # the sentinels name it


def test_a_wrong_master_name_or_silent_sentinels_are_said_plainly(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    with SentinelSet(tmp_path / "s", replicas=1) as found:
        wrong = sentinel_settings(sandbox, found, redis_sentinel_master="not-ours")
        silent = sentinel_settings(sandbox, found, redis_sentinels="127.0.0.1:1,127.0.0.1:2")
        for settings, said in (
            (wrong, "no sentinel knows a master named 'not-ours' that is up"),
            (silent, "no master named 'capi-test' found: 2 of the sentinels did not answer"),
        ):
            status = capi(settings, "status")
            assert status.returncode == ExitCode.REDIS, status.stderr
            assert said in status.stderr
            assert "CAPI_REDIS_SENTINEL_MASTER" in status.stderr
            assert "<redis" not in status.stderr  # no client reprs
            with (
                SyncProducer.from_settings(settings) as producer,
                pytest.raises(QueueUnavailable) as raised,
            ):
                producer.enqueue(events(1)[0])
            assert said in str(raised.value)
            assert "Check CAPI_REDIS_SENTINELS and CAPI_REDIS_SENTINEL_MASTER" in str(raised.value)


def test_a_dead_master_the_sentinels_still_name_is_said_with_the_sentinels_settings(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    """Between a master's death and its failover the sentinels still name it: ``capi
    status`` and ``capi tail`` said "Redis is not reachable (...); check CAPI_REDIS_URL",
    a setting whose host is not even used under Sentinel. They name the sentinels'
    settings and the failover to wait for."""
    with SentinelSet(tmp_path / "s", down_after_ms=60_000, replicas=1) as found:
        settings = sentinel_settings(sandbox, found)
        found.master.kill()  # no failover for a minute: the sentinels name the dead master
        for command in (["status"], ["tail"]):
            done = capi(settings, *command)
            assert done.returncode == ExitCode.REDIS, done.stdout + done.stderr
            assert "Redis is not reachable" in done.stderr, done.stderr
            assert "CAPI_REDIS_SENTINELS" in done.stderr, done.stderr
            assert "check CAPI_REDIS_URL" not in done.stderr, done.stderr
            assert "Traceback" not in done.stderr


def test_a_wrong_password_under_sentinel_is_said_as_such_not_as_a_dead_master(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    """Redis refusing the URL's password is no master down: ``capi status`` said "Redis is
    not reachable (invalid username-password pair ...); the master the sentinels name may
    be down (a failover follows ...)", sending the operator to wait for a failover."""
    with SentinelSet(tmp_path / "s", password="sentinel-test-pw", replicas=1) as found:
        settings = sentinel_settings(sandbox, found)
        done = capi(
            settings, "status", extra_env={"CAPI_REDIS_URL": "redis://:Not-The-Pw-7x@127.0.0.1:1/0"}
        )
    assert done.returncode == ExitCode.REDIS, done.stdout + done.stderr
    assert "credentials in CAPI_REDIS_URL" in done.stderr, done.stderr
    assert "may be down" not in done.stderr and "not reachable" not in done.stderr, done.stderr
    assert "Not-The-Pw-7x" not in done.stderr  # the password itself is never said
