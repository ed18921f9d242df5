"""Redis Sentinel failover for real: a master, two replicas and three sentinels
(tests/sentinelproc.py); the master is killed with ``kill -9`` while an async producer,
``capi serve`` and two ``capi worker`` run against the sandbox. With
``CAPI_ENQUEUE_DURABILITY=replica`` every acknowledged event is delivered, duplicates are
counted and bounded, and the time from the kill to the first delivery of an event written
to the new master is printed (``pytest -s -n 0 tests/test_sentinel_failover.py``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from capi.errors import QueueUnavailable
from capi.producer import Producer
from capi.sandbox import SandboxThread
from capi.sandbox.state import DEFAULT_KEY, DEFAULT_PIXEL
from capi.settings import Settings
from tests.helpers import events, start_worker, stop_worker, wait_for
from tests.intake_helpers import TOKEN, IntakeProcess, start_intake
from tests.sentinelproc import MASTER_NAME, SentinelSet, sentinel_settings

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


# Each client's pause between events: at most a few hundred events/s each, so that the
# workers keep up even on a loaded machine and the queue stays short (an unpaced client
# built a backlog of 80,000 events there, which took longer to drain than the waits below).
PACE_S = 0.002


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
                await asyncio.sleep(PACE_S)

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
            time.sleep(PACE_S)


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


def all_delivered(sandbox: SandboxThread, acked: set[str], stalled_s: float) -> set[str]:
    """The acknowledged events not delivered once all are, or once no event has been
    delivered for ``stalled_s`` (a backlog a loaded machine drains slowly is still waited
    for; a lost event is not delivered however long one waits)."""
    last, progress = -1, time.monotonic()
    while True:
        delivered = sandbox.state.delivered_ids()
        missing = acked - set(delivered)
        if not missing:
            return missing
        if len(delivered) != last:
            last, progress = len(delivered), time.monotonic()
        elif time.monotonic() - progress > stalled_s:
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
    lost = all_delivered(sandbox, acked, stalled_s=30)
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
        f"{unreplicated} delivered since the replicas last heard); {acks.retries} sends retried; "
        f"most deliveries of one event: {max(delivered.values())}"
    )
    assert not lost, f"{len(lost)} acknowledged events were lost, e.g. {sorted(lost)[:5]}"
    assert duplicates <= bound, f"{duplicates} duplicates"
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
