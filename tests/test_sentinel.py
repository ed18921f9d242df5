"""Redis Sentinel for real: a master, two replicas and three sentinels (tests/sentinelproc.py).

The master is killed with ``kill -9`` while a producer, ``capi serve`` and two ``capi
worker`` run against the sandbox: with ``CAPI_ENQUEUE_DURABILITY=replica`` every
acknowledged event is delivered, and the time from the kill to the first delivery of an
event written to the new master is printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
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
from tests.helpers import capi, events, make_settings, start_worker, stop_worker, wait_for
from tests.intake_helpers import TOKEN, IntakeProcess, start_intake
from tests.sentinelproc import MASTER_NAME, SentinelSet

WORKERS = 2
BATCH_SIZE = 20
# A worker runs 4 lanes per CAPI_CONCURRENCY, each with at most one batch in flight.
CONCURRENCY = 2
IN_FLIGHT_BOUND = WORKERS * 4 * CONCURRENCY * BATCH_SIZE


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    """Three sentinels watching a master and two replicas; all stopped after the test."""
    with SentinelSet(tmp_path / "sentinel", down_after_ms=1000, failover_timeout_ms=3000) as s:
        yield s


def sentinel_settings(sandbox: SandboxThread, found: SentinelSet, **overrides: Any) -> Settings:
    # The URL's host is a port nothing listens on: only the sentinels can name the master.
    values = {"redis_sentinels": found.addresses, "redis_sentinel_master": MASTER_NAME}
    return make_settings(sandbox, "redis://127.0.0.1:1/0", **{**values, **overrides})


class Acks:
    """Event ids acknowledged by a producer or the intake, with when."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.before_kill: set[str] = set()
        self.after_kill: set[str] = set()  # sent after the kill: only the new master has them
        self.killed_at: float | None = None
        self.first_new: float | None = None  # the first delivery of an after_kill event
        self.retries = 0

    def add(self, event_id: str, sent_at: float) -> None:
        with self.lock:
            after = self.killed_at is not None and sent_at > self.killed_at
            (self.after_kill if after else self.before_kill).add(event_id)

    def all(self) -> set[str]:
        with self.lock:
            return self.before_kill | self.after_kill


def produce(settings: Settings, acks: Acks, stop: threading.Event) -> None:
    """The async producer: one event at a time, each sent again until acknowledged."""

    async def go() -> None:
        async with Producer.from_settings(settings) as producer:
            for i in range(1_000_000):
                if stop.is_set():
                    return
                event = events(1, start=i, prefix="prod-")[0]
                while not stop.is_set():
                    sent_at = time.monotonic()
                    try:
                        await producer.enqueue(event)  # True or a duplicate: both stored
                    except QueueUnavailable:
                        acks.retries += 1
                        await asyncio.sleep(0.05)  # a real producer's backoff
                        continue
                    acks.add(event["id"], sent_at)
                    break

    asyncio.run(go())


def post(url: str, acks: Acks, stop: threading.Event) -> None:
    """Single-event POSTs to ``capi serve``, each sent again until answered 200."""
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        for i in range(1_000_000):
            event = events(1, start=i, prefix="http-")[0]
            while not stop.is_set():
                sent_at = time.monotonic()
                try:
                    answer = client.post(url + "/v1/events", json={"events": [event]})
                except httpx.HTTPError:
                    answer = None
                if answer is not None and answer.status_code == 200:
                    status = answer.json()["results"][0]["status"]
                    assert status in ("queued", "duplicate"), answer.text
                    acks.add(event["id"], sent_at)
                    break
                acks.retries += 1
                time.sleep(0.05)
            if stop.is_set():
                return


def start_clients(
    tmp_path: Path, sandbox: SandboxThread, found: SentinelSet, durability: str
) -> tuple[list[subprocess.Popen[str]], IntakeProcess]:
    """Two ``capi worker`` and a ``capi serve``, all given only the sentinels."""
    settings = sentinel_settings(
        sandbox,
        found,
        enqueue_durability=durability,
        redis_timeout_s=1.0,
        batch_size=BATCH_SIZE,
        concurrency=CONCURRENCY,
    )
    workers = [start_worker(settings) for _ in range(WORKERS)]
    intake = start_intake(
        tmp_path,
        "redis://127.0.0.1:1/0",
        CAPI_REDIS_SENTINELS=found.addresses,
        CAPI_REDIS_SENTINEL_MASTER=MASTER_NAME,
        CAPI_ENQUEUE_DURABILITY=durability,
        CAPI_PIXEL_ID=DEFAULT_PIXEL,
        CAPI_API_KEY=DEFAULT_KEY,
    )
    return workers, intake


def all_delivered(sandbox: SandboxThread, acked: set[str], timeout_s: float) -> set[str]:
    """The acknowledged events not delivered once all are, or ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = acked - set(sandbox.state.delivered_ids())
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.1)


# The durability under test: `replica` (tests/ can be run with CAPI_TEST_SENTINEL_DURABILITY
# =memory to see the lagging-replica case lose acknowledged events).
DURABILITY = os.environ.get("CAPI_TEST_SENTINEL_DURABILITY", "replica")


@pytest.mark.parametrize("lagging", [False, True], ids=["replicas-current", "replicas-lagging"])
def test_a_master_killed_under_load_loses_no_acknowledged_event(
    tmp_path: Path, sandbox: SandboxThread, sentinels: SentinelSet, lagging: bool
) -> None:
    """``lagging``: both replicas are frozen (SIGSTOP) and their replication links cut
    (CLIENT KILL) for the last 0.5 s before the kill, and thawed just after it, so the
    master's last writes never reach them: under ``memory`` those acknowledged events are
    lost; under ``replica`` they were never acknowledged."""
    workers, intake = start_clients(tmp_path, sandbox, sentinels, DURABILITY)
    settings = sentinel_settings(sandbox, sentinels, enqueue_durability=DURABILITY)
    acks, stop = Acks(), threading.Event()
    threads = [
        threading.Thread(target=produce, args=(settings, acks, stop), daemon=True),
        threading.Thread(target=post, args=(intake.url, acks, stop), daemon=True),
        threading.Thread(target=watch, args=(sandbox, acks, stop), daemon=True),
    ]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(sandbox.state.delivered_ids()) >= 300, 60, "deliveries before")
        sent_at_freeze = sum(sandbox.state.delivered_ids().values())
        if lagging:
            for replica in sentinels.replicas:
                replica.freeze()
            with sentinels.master.client() as master:  # what it sent so far is all they get
                master.client_kill_filter(_type="slave")
            time.sleep(0.5)  # the fault's length: writes the replicas do not get
        old_port = sentinels.master.port
        acks.killed_at = time.monotonic()
        sentinels.master.kill()  # kill -9
        # Deliveries whose acknowledgement the replicas may not have (none when they are
        # current): the new master hands those events out again.
        unreplicated = sum(sandbox.state.delivered_ids().values()) - sent_at_freeze
        for replica in sentinels.replicas if lagging else []:
            replica.thaw()
        wait_for(lambda: sentinels.promoted(old_port), 30, "a new master")
        promoted_s = time.monotonic() - acks.killed_at
        wait_for(lambda: len(acks.after_kill) >= 300, 60, "acknowledgements after the kill")
        wait_for(lambda: acks.first_new is not None, 60, "a delivery from the new master")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    acked = acks.all()
    lost = all_delivered(sandbox, acked, 60)
    delivered = sandbox.state.delivered_ids()
    duplicates = sum(n - 1 for n in delivered.values() if n > 1)
    bound = IN_FLIGHT_BOUND + unreplicated
    outputs = [stop_worker(w) for w in workers]
    intake.stop()
    assert acks.first_new is not None
    print(
        f"\nsentinel failover ({DURABILITY}, {'lagging' if lagging else 'current'} replicas): "
        f"a sentinel names the new master {promoted_s:.2f} s after kill -9; first delivery "
        f"from the new master {acks.first_new - acks.killed_at:.2f} s after; "
        f"{len(acks.before_kill)} acked before, {len(acks.after_kill)} after, {len(lost)} "
        f"lost; {duplicates} duplicates (bound {bound}: {IN_FLIGHT_BOUND} in flight + "
        f"{unreplicated} delivered since the replicas last heard); {acks.retries} sends retried"
    )
    assert not lost, f"{len(lost)} acknowledged events were lost, e.g. {sorted(lost)[:5]}"
    assert duplicates <= bound, f"{duplicates} duplicates"
    assert max(delivered.values()) <= 2  # a duplicate is one extra delivery, never more
    assert all("Traceback" not in out for out in outputs), outputs


def watch(sandbox: SandboxThread, acks: Acks, stop: threading.Event) -> None:
    """Note when the first event sent after the kill (so written to the new master) is
    delivered; polls every 10 ms."""
    while not stop.is_set() and acks.first_new is None:
        with acks.lock:
            after = set(acks.after_kill)
        if after and after & set(sandbox.state.delivered_ids()):
            acks.first_new = time.monotonic()
        time.sleep(0.01)


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

        async def go() -> list[tuple[str, float]]:
            async with Producer.from_settings(settings) as producer:
                assert await producer.enqueue(events(1)[0])  # one pooled connection
                found.master.freeze()
                started = time.monotonic()

                async def one(event: dict[str, Any]) -> tuple[str, float]:
                    try:
                        await producer.enqueue(event)
                        outcome = "queued"
                    except QueueUnavailable:
                        outcome = "unavailable"
                    return outcome, time.monotonic() - started

                return await asyncio.gather(*(one(e) for e in events(CALLERS, start=1)))

        answers = asyncio.run(asyncio.wait_for(go(), 60))
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
                    with found.sentinel(found.sentinel_ports[0]) as s:
                        s.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
                    wait_for(lambda: found.promoted(old.port), 30, "switchover")
                    with old.client() as c:  # the old master is a replica now
                        wait_for(lambda: c.info("replication")["role"] == "slave", 30, "demotion")
                    for event in events(20, start=2):
                        assert await producer.enqueue(event)
                    assert sync_producer.enqueue_many(events(20, start=22)).queued == 20

        asyncio.run(asyncio.wait_for(go(), 90))
        new = next(r for r in found.replicas if r.port == found.master_port())
        with new.client() as c:
            assert c.xlen("capi:events") == 42


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
