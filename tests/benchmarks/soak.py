"""Soak under every fault of issue 9, injected for real in one run; then account for every
event.

    python -m tests.benchmarks.soak                         # 50,000 events, ~2 minutes
    python -m tests.benchmarks.soak --events 5000 --scale 0.5 --kills 3

One run, its own redis-server (AOF, fsync always, via tests/redisproc.py), the sandbox in a
thread, worker subprocesses and a producer thread that keeps enqueueing all along. Faults
are scheduled by TIME, in phases, never by request count: each phase lasts its time and,
where a fault could in principle miss (a producer refusal, a 503, a 401), goes on (bounded)
until the fault is seen, so every fault surely happens in every run however slow the
machine. The phases, in order:

1. backlog: workers start on a pre-enqueued wave (a few events doomed, so the API rejects
   them); its drain rate is the "normal rate" of the run;
2. kills: kill -9 of a worker holding events in flight, several times, each restarted;
3. Redis restart: kill -9 of redis-server, started again on the same port (AOF);
4. client-kill storm: ``CLIENT KILL TYPE normal`` every 100 ms;
5. Redis full: maxmemory at current usage under noeviction (re-applied while workers free
   memory); producers get QueueFull, count it and retry later;
6. Redis frozen: SIGSTOP, then SIGCONT;
7. endpoint outage: every request answered 503 (no attempt cap: nothing may be
   dead-lettered for it);
8. slow endpoint: every request delayed;
9. drain: the faults end (the intermittent ones go on until each has fired) and the soak
   waits until every event has a fate.

Throughout, except during the outage, intermittent faults are armed by time (Blips: one
every second, for the next request, in turn a missing-scope 401, an RBAC 403, a 429 and a
response dropped after the batch was committed; never two in a row, as seen in the wild),
over some latency. ``--dense-faults`` uses the old soak's count-scheduled ones instead
(about one request in five faulted), which shows a key-guard bug. At the end every
enqueued event must be delivered (by id, at the sandbox), dead-lettered with a true
reason, or still queued: lost = 0.
Duplicates are counted (at-least-once allows them; the API dedups on the id).

The recovery figure of issue 9 item 9: for each kill, the events the killed worker held
are followed (by stream id) from the kill until each has a fate; the reclaim rate
(events/s from the first taken over to the last given a fate) is printed next to the
normal rate (the backlog's drain).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import redis

from capi.constants import CONSUMER_GROUP
from capi.errors import QueueFull, QueueUnavailable
from capi.producer import SyncProducer
from capi.sandbox import Fault, SandboxThread
from capi.settings import Settings
from tests.helpers import _plain, doom, make_settings
from tests.helpers import events as make_events
from tests.redisproc import RedisProcess


@dataclass
class Recovery:
    """What happened to the events a killed worker held."""

    events: int
    kill_to_first_reclaim_s: float | None = None
    reclaim_s: float | None = None  # first taken over -> last given a fate
    kill_to_done_s: float | None = None

    @property
    def rate(self) -> float | None:
        """Events per second, from the first reclaimed to the last given a fate."""
        if not self.reclaim_s or self.events < 2:
            return None
        return round(self.events / max(self.reclaim_s, 0.1), 1)


@dataclass
class SoakReport:
    """How the soak went, and whether every event is accounted for."""

    events: int
    delivered: int = 0
    dead_lettered: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    queued: int = 0
    lost: list[str] = field(default_factory=list)
    wrongly_dead_lettered: list[str] = field(default_factory=list)
    doomed_not_dead_lettered: list[str] = field(default_factory=list)
    duplicates: int = 0
    kills: int = 0
    redis_restarts: int = 0
    client_kills: int = 0
    full_refusals: int = 0
    unavailable_refusals: int = 0
    freeze_s: float = 0.0
    outage_s: float = 0.0
    slow_s: float = 0.0
    worker_exits: list[str] = field(default_factory=list)
    stuck: dict[str, int] = field(default_factory=dict)
    stuck_since: dict[str, str] = field(default_factory=dict)
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    normal_rate: float | None = None
    recoveries: list[Recovery] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every event delivered, dead-lettered with a true reason or still queued, no
        worker exited by itself."""
        return (
            not self.lost
            and not self.wrongly_dead_lettered
            and not self.doomed_not_dead_lettered
            and not self.worker_exits
        )

    def figures(self) -> dict[str, Any]:
        """The printed figures, as JSON-ready data."""
        rates = [r.rate for r in self.recoveries if r.rate is not None]
        data = asdict(self)
        data["lost"] = len(self.lost)
        data["lost_ids"] = self.lost[:20]
        data["wrongly_dead_lettered"] = self.wrongly_dead_lettered[:20]
        data["doomed_not_dead_lettered"] = self.doomed_not_dead_lettered[:20]
        data["recoveries"] = [{**asdict(r), "rate": r.rate} for r in self.recoveries]
        data["reclaim_rate_median"] = sorted(rates)[len(rates) // 2] if rates else None
        data["ok"] = self.ok
        return data


def dense_faults() -> list[Fault]:
    """The old soak's intermittent faults, on the request count (about one request in five
    faulted). With several workers, three key probes in a row can meet three of them and
    the key guard then confirms a key problem that is not there (see the report)."""
    return [
        Fault("missing_scope", every=23),
        Fault("rbac", every=29),
        Fault("rate_limit", every=13, retry_after_s=0.05),
        Fault("drop", every=19),
        Fault("latency", every=2, latency_ms=60),
    ]


INTERMITTENT = ("missing_scope", "rbac", "rate_limit", "drop")


class Blips(threading.Thread):
    """The intermittent faults, by time: every ``gap_s`` one fault is armed for the next
    request (401 missing scope, 403 RBAC, 429, a response dropped after the commit, in
    turn), once the previous one has been consumed; so never two in a row, as seen in the
    wild, and each kind surely fires while there is traffic. Under them lie the phase's
    own faults (:meth:`under`): some latency by default, every request a 503 during the
    outage (the blips then never fire), a slow endpoint."""

    def __init__(self, sandbox: SandboxThread, gap_s: float = 1.0) -> None:
        super().__init__(name="soak-blips", daemon=True)
        self.sandbox = sandbox
        self.gap_s = gap_s
        self.base = [Fault("latency", every=2, latency_ms=60)]
        self.fired: dict[str, int] = dict.fromkeys(INTERMITTENT, 0)
        self.armed: Fault | None = None
        self.paused = False
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def under(self, faults: list[Fault], *, blips: bool = True) -> None:
        """Set the phase's faults; ``blips=False`` pauses the intermittent ones."""
        with self.lock:
            self.base = faults
            self.paused = not blips
            self._apply()

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        with self.lock:
            self.paused = True
            self.base = []
            self._apply()

    def _apply(self) -> None:
        armed = [self.armed] if self.armed and not self.paused else []
        self.sandbox.state.faults = [*armed, *self.base]

    def run(self) -> None:
        turn = 0
        while not self.stopping.wait(self.gap_s):
            with self.lock:
                if self.armed is not None:
                    if self.armed.remaining:
                        continue  # not consumed yet
                    self.fired[self.armed.kind] += 1
                    self.armed = None
                if self.paused:
                    self._apply()
                    continue
                kind = INTERMITTENT[turn % len(INTERMITTENT)]
                turn += 1
                self.armed = Fault(kind, every=1, remaining=1, retry_after_s=0.05)  # type: ignore[arg-type]
                self._apply()

    def all_fired(self) -> bool:
        with self.lock:
            if self.armed is not None and not self.armed.remaining:
                self.fired[self.armed.kind] += 1
                self.armed = None
            return all(self.fired.values())


@dataclass
class Phases:
    """How long each timed phase lasts, in seconds."""

    kill_every_s: float = 2.5
    storm_s: float = 4.0
    full_s: float = 4.0
    freeze_s: float = 4.0
    outage_s: float = 8.0
    slow_s: float = 4.0
    slow_latency_ms: int = 500
    settle_s: float = 1.5  # between phases: the workers take up their work again

    def scaled(self, factor: float) -> Phases:
        return Phases(
            kill_every_s=self.kill_every_s * factor,
            storm_s=self.storm_s * factor,
            full_s=self.full_s * factor,
            freeze_s=min(self.freeze_s * factor, 8.0),  # under the 10 s liveness of a worker
            outage_s=self.outage_s * factor,
            slow_s=self.slow_s * factor,
            slow_latency_ms=self.slow_latency_ms,
            settle_s=self.settle_s * factor,
        )


class Producer(threading.Thread):
    """Enqueues its events in chunks, a share in each phase (paced over the phase's time,
    so producers are at work during every fault); on QueueFull or QueueUnavailable it
    counts the refusal and tries the same chunk again later."""

    def __init__(self, settings: Settings, evts: list[dict[str, Any]], shares: int) -> None:
        super().__init__(name="soak-producer", daemon=True)
        self.settings = settings
        self.chunk = 25
        chunks = [evts[i : i + self.chunk] for i in range(0, len(evts), self.chunk)]
        n = len(chunks)
        self.shares = [chunks[i * n // shares : (i + 1) * n // shares] for i in range(shares)]
        self.feed: queue.Queue[float | None] = queue.Queue()
        self.full = 0
        self.unavailable = 0
        self.queued = 0
        self.duplicates = 0
        self.stopping = threading.Event()
        self.errors: list[str] = []

    def phase(self, over_s: float) -> None:
        """Enqueue the next share of events, spread over ``over_s`` seconds."""
        self.feed.put(over_s)

    def finish(self) -> None:
        """Enqueue whatever is left at once, then end."""
        self.feed.put(None)

    def run(self) -> None:
        with SyncProducer.from_settings(self.settings) as producer:
            while self.shares and not self.stopping.is_set():
                over_s = self.feed.get()
                share = [c for s in self.shares for c in s] if over_s is None else self.shares[0]
                self.shares = [] if over_s is None else self.shares[1:]
                started = time.monotonic()
                for n, chunk in enumerate(share):
                    wait = started + n * (over_s or 0) / len(share) - time.monotonic()
                    if wait > 0 and self.stopping.wait(wait):
                        return
                    self._enqueue(producer, chunk)

    def _enqueue(self, producer: SyncProducer, chunk: list[dict[str, Any]]) -> None:
        while not self.stopping.is_set():
            try:
                report = producer.enqueue_many(chunk)
            except QueueFull:
                self.full += 1
                self.stopping.wait(0.2)
                continue
            except QueueUnavailable:
                self.unavailable += 1
                self.stopping.wait(0.2)
                continue
            except Exception as exc:  # a bug: say so, and keep the chunk
                self.errors.append(repr(exc))
                self.stopping.wait(0.2)
                continue
            self.queued += report.queued
            self.duplicates += report.duplicates  # a retried chunk already stored
            return


class Tracker:
    """Follows a set of stream entries until each has a fate (is gone from the stream)."""

    def __init__(
        self, stream_ids: list[bytes], started: float, consumers: list[str] | None = None
    ) -> None:
        self.ids = set(stream_ids)
        self.total = len(stream_ids)
        self.started = started  # the kill, or the workers' start
        self.consumers = consumers or []  # a killed worker's consumers: reclaim starts when
        self.first_moved: float | None = None  # one of its entries leaves them
        self.first_done: float | None = None
        self.done_at: float | None = None

    def poll(self, client: redis.Redis, stream: str, now: float) -> None:
        if self.done_at is not None:
            return
        if self.consumers and self.first_moved is None:
            held = 0
            for c in self.consumers:
                held += len(
                    client.xpending_range(stream, CONSUMER_GROUP, "-", "+", 100_000, c) or []
                )
            if held < self.total:
                self.first_moved = now
        pipe = client.pipeline(transaction=False)
        order = sorted(self.ids)
        for sid in order:
            pipe.xrange(stream, sid, sid)
        rows = pipe.execute()
        for sid, row in zip(order, rows, strict=True):
            if not row:
                self.ids.discard(sid)
        if self.ids and len(self.ids) < self.total and self.first_done is None:
            self.first_done = now
        if not self.ids:
            self.first_done = self.first_done or now
            self.first_moved = self.first_moved or self.first_done
            self.done_at = now


class Monitor(threading.Thread):
    """Polls the trackers ten times a second; Redis trouble is waited out."""

    def __init__(self, redis_url: str, stream: str) -> None:
        super().__init__(name="soak-monitor", daemon=True)
        self.redis_url = redis_url
        self.stream = stream
        self.trackers: list[Tracker] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def add(self, tracker: Tracker) -> None:
        with self.lock:
            self.trackers.append(tracker)

    def run(self) -> None:
        client = redis.Redis.from_url(self.redis_url, socket_timeout=0.5)
        while not self.stopping.wait(0.1):
            with self.lock:
                trackers = list(self.trackers)
            for t in trackers:
                try:
                    t.poll(client, self.stream, time.monotonic())
                except redis.exceptions.RedisError:
                    break  # Redis away, full or frozen: poll again later
        client.close()


class Workers:
    """Worker subprocesses, each logging to a file of its own."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[IO[bytes]] = []
        self.killed: set[int] = set()
        self.started = 0

    def start(self, *, burst: bool = False) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
        env.update({f"CAPI_{k.upper()}": str(v) for k, v in _plain(self.settings).items()})
        env["CAPI_CONFIG_FILE"] = os.devnull
        self.started += 1
        log = (self.log_dir / f"worker-{self.started:02d}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker", *(["--burst"] if burst else [])],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        self.logs.append(log)
        return len(self.procs) - 1

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if i not in self.killed and p.poll() is None]

    def kill(self, index: int) -> None:
        self.procs[index].send_signal(signal.SIGKILL)
        self.procs[index].wait(10)
        self.killed.add(index)

    def exited_by_themselves(self) -> list[str]:
        return [
            f"worker-{i + 1:02d}.log: exit {p.returncode}"
            for i, p in enumerate(self.procs)
            if i not in self.killed and p.poll() is not None
        ]

    def stop(self) -> None:
        for i in self.alive():
            self.procs[i].send_signal(signal.SIGTERM)
        for i, p in enumerate(self.procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
                self.killed.add(i)
        for log in self.logs:
            log.close()


def _consumers_of(client: redis.Redis, stream: str, pid: int) -> list[str]:
    """The consumer names of the worker with this pid (``host:pid:uuid:lane``)."""
    consumers = client.xinfo_consumers(stream, CONSUMER_GROUP)
    names = [c["name"] for c in consumers]
    return [n.decode() if isinstance(n, bytes) else n for n in names if f":{pid}:" in str(n)]


def _held(client: redis.Redis, stream: str, consumers: list[str]) -> list[bytes]:
    out: list[bytes] = []
    for c in consumers:
        rows = client.xpending_range(stream, CONSUMER_GROUP, "-", "+", 100_000, c)
        out += [r["message_id"] for r in rows]
    return out


def _until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except redis.exceptions.RedisError:
            pass
        time.sleep(step_s)
    return False


def _kill_one(
    pool: Workers,
    admin: redis.Redis,
    stream: str,
    monitor: Monitor,
    rng: random.Random,
    every_s: float,
) -> None:
    """kill -9 a worker holding events in flight, follow what it held, start another."""
    time.sleep(every_s / 2)
    victim = rng.choice(pool.alive())
    pid = pool.procs[victim].pid
    # Wait (bounded) for the victim to hold events, so the kill leaves some behind.
    _until(lambda: bool(_held(admin, stream, _consumers_of(admin, stream, pid))), 5)
    pool.kill(victim)
    killed_at = time.monotonic()
    try:
        consumers = _consumers_of(admin, stream, pid)
        held = _held(admin, stream, consumers)
    except redis.exceptions.RedisError:
        consumers, held = [], []
    if held:
        monitor.add(Tracker(held, killed_at, consumers))
    pool.start()
    time.sleep(every_s / 2)


def _client_kill_storm(admin: redis.Redis, seconds: float) -> int:
    """CLIENT KILL TYPE normal every 100 ms for ``seconds`` (and until one was killed)."""
    killed = 0
    end = time.monotonic() + seconds
    while (time.monotonic() < end or killed == 0) and time.monotonic() < end + 10:
        with contextlib.suppress(redis.exceptions.RedisError):
            killed += int(
                admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            )
        time.sleep(0.1)
    return killed


# Full means maxmemory this far under the memory in use: the workers, which free memory as
# they deliver, would have to deliver some thousands of events before producers get in.
FULL_MARGIN = 1 << 20


def _full(server: RedisProcess, producer: Producer, seconds: float) -> None:
    """Redis full for ``seconds`` (and until the producer was refused), then not."""
    refused_before = producer.full
    server.fill(FULL_MARGIN)
    producer.phase(seconds)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end or producer.full == refused_before:
            if time.monotonic() > end + 15 or not producer.is_alive():
                break
            time.sleep(0.3)
            server.fill(FULL_MARGIN)  # workers free memory as they deliver: full again
    finally:
        server.unfill()


def soak(
    sandbox: SandboxThread,
    server: RedisProcess,
    settings: Settings,
    log_dir: Path,
    *,
    n_events: int,
    workers: int = 3,
    kills: int = 4,
    doomed: int = 5,
    seed: int = 7,
    phases: Phases | None = None,
    drain_timeout_s: float = 120,
    finish: bool = True,
    dense: bool = False,
) -> SoakReport:
    """Run every fault against a sandbox and a Redis of the soak's own; the accounting.

    With ``finish``, once the running workers are stopped a fresh ``--burst`` worker takes
    over whatever they left pending (see :func:`_stuck`) and exits once all is delivered.
    With ``dense``, the intermittent faults are the old soak's, on the request count
    (:func:`dense_faults`), instead of :class:`Blips`.
    """
    ph = phases or Phases()
    rng = random.Random(seed)
    started = time.monotonic()
    report = SoakReport(events=n_events)
    stream = settings.keys.stream
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks[name] = time.monotonic()

    evts = make_events(n_events, prefix="soak-")
    cut = max(doomed * 20, n_events // 5)
    wave, rest = evts[:cut], evts[cut:]
    with SyncProducer.from_settings(settings) as producer:
        assert producer.enqueue_many(wave).ok
    admin = server.client()
    stream_len = admin.xlen(stream)
    bad_ids = set(doom(settings, positions=rng.sample(range(stream_len), doomed)))
    wave_ids = [sid for sid, _ in admin.xrange(stream)]
    sandbox.state.rng = random.Random(seed)
    blips = Blips(sandbox)
    if dense:
        blips.base = dense_faults()
        blips.paused = True
    blips._apply()
    blips.start()
    background = list(blips.base)

    monitor = Monitor(settings.redis_url, stream)
    monitor.start()
    pool = Workers(settings, log_dir)
    # -- backlog: the normal rate ------------------------------------------------------------
    mark("backlog")
    for _ in range(workers):
        pool.start()
    backlog = Tracker(wave_ids, time.monotonic())
    monitor.add(backlog)
    _until(lambda: backlog.done_at is not None, 60)
    if backlog.done_at is not None and backlog.first_done is not None:
        span = backlog.done_at - backlog.first_done
        report.normal_rate = round(len(wave_ids) / max(span, 0.1), 1)

    # The rest arrives all along: a share in each faulty phase, refused and retried as needed.
    producer_thread = Producer(settings, rest, shares=8)  # the last share in the drain
    producer_thread.start()

    # -- kills: a worker holding events in flight, kill -9, started again ---------------
    mark("kills")
    producer_thread.phase(kills * ph.kill_every_s)
    blips.under([*background, Fault("latency", every=1, latency_ms=150)], blips=not dense)
    for _ in range(kills):
        _kill_one(pool, admin, stream, monitor, rng, ph.kill_every_s)
        report.kills += 1
    blips.under(list(background), blips=not dense)

    # -- Redis restart, with persistence ---------------------------------------------------
    mark("redis_restart")
    producer_thread.phase(ph.settle_s)
    time.sleep(ph.settle_s / 2)
    server.restart()
    report.redis_restarts += 1
    admin = server.client()
    time.sleep(ph.settle_s)

    # -- a storm of CLIENT KILL ------------------------------------------------------------
    mark("client_kill_storm")
    producer_thread.phase(ph.storm_s)
    report.client_kills = _client_kill_storm(admin, ph.storm_s)
    time.sleep(ph.settle_s)

    # -- Redis full, while the producer keeps trying -----------------------------------------
    mark("redis_full")
    _full(server, producer_thread, ph.full_s)
    time.sleep(ph.settle_s)

    # -- Redis frozen ------------------------------------------------------------------------
    mark("redis_frozen")
    producer_thread.phase(ph.freeze_s)
    server.freeze()
    frozen_at = time.monotonic()
    try:
        time.sleep(ph.freeze_s)
    finally:
        server.thaw()
    report.freeze_s = round(time.monotonic() - frozen_at, 1)
    time.sleep(ph.settle_s)

    # -- endpoint outage: every request a 503 ------------------------------------------------
    mark("endpoint_outage")
    before = sandbox.state.summary()["statuses"].get("503", 0)
    blips.under([Fault("server_error", every=1, status=503)], blips=False)
    outage_at = time.monotonic()
    producer_thread.phase(ph.outage_s)
    time.sleep(ph.outage_s)
    _until(lambda: sandbox.state.summary()["statuses"].get("503", 0) > before, 15)
    blips.under(list(background), blips=not dense)
    report.outage_s = round(time.monotonic() - outage_at, 1)
    time.sleep(ph.settle_s)

    # -- slow endpoint -----------------------------------------------------------------------
    mark("slow_endpoint")
    blips.under([Fault("latency", every=1, latency_ms=ph.slow_latency_ms)], blips=not dense)
    slow_at = time.monotonic()
    producer_thread.phase(ph.slow_s)
    time.sleep(ph.slow_s)
    blips.under(list(background), blips=not dense)
    report.slow_s = round(time.monotonic() - slow_at, 1)

    # -- drain: intermittent faults until each has fired, then none ----------------------
    mark("drain")
    producer_thread.phase(2 * ph.settle_s)  # traffic, for the intermittent faults to hit
    producer_thread.finish()
    producer_thread.join(max(1.0, drain_timeout_s / 2))
    producer_thread.stopping.set()

    def fired() -> bool:
        statuses = sandbox.state.summary()["statuses"]
        return all(statuses.get(s, 0) > 0 for s in ("401", "403", "429", "0"))

    _until(lambda: fired() and (dense or blips.all_fired()), 30)
    blips.stop()
    _until(lambda: _settled(admin, settings), drain_timeout_s, 0.2)
    mark("stop")
    report.stuck = _stuck(admin, settings)
    report.stuck_since = _stuck_since(admin, settings)
    monitor.stopping.set()
    monitor.join(5)
    report.worker_exits = pool.exited_by_themselves()
    pool.stop()
    if finish:
        mark("finisher")
        finisher = pool.start(burst=True)
        try:
            pool.procs[finisher].wait(max(30.0, drain_timeout_s / 2))
        except subprocess.TimeoutExpired:
            report.worker_exits.append("the finishing --burst worker did not finish")
        pool.stop()
    mark("end")

    report.full_refusals = producer_thread.full
    report.unavailable_refusals = producer_thread.unavailable
    for tracker in monitor.trackers[1:]:
        r = Recovery(events=tracker.total)
        if tracker.first_moved is not None:
            r.kill_to_first_reclaim_s = round(tracker.first_moved - tracker.started, 2)
        if tracker.done_at is not None and tracker.first_moved is not None:
            r.reclaim_s = round(tracker.done_at - tracker.first_moved, 2)
            r.kill_to_done_s = round(tracker.done_at - tracker.started, 2)
        report.recoveries.append(r)
    names = list(marks)
    report.phases = {a: round(marks[b] - marks[a], 1) for a, b in itertools.pairwise(names)}
    _account(report, sandbox, settings, {e["id"] for e in evts}, bad_ids)
    if producer_thread.errors:
        report.worker_exits.append(f"producer errors: {producer_thread.errors[:3]}")
    report.seconds = round(time.monotonic() - started, 1)
    admin.close()
    return report


STUCK_IDLE_MS = 5_000


def _pending(client: redis.Redis, settings: Settings) -> tuple[list[dict[str, Any]], set[str]]:
    rows = client.xpending_range(settings.keys.stream, CONSUMER_GROUP, "-", "+", 100_000)
    now_ms = int(time.time() * 1000)
    live = client.zrangebyscore(settings.keys.workers, now_ms - 10_000, "+inf")
    return rows, {n.decode() for n in live}


def _stuck(client: redis.Redis, settings: Settings) -> dict[str, int]:
    """Entries pending in a LIVE worker's consumer, untouched for STUCK_IDLE_MS: the worker
    renews its lease on what it works on every claim_idle/4, so it no longer knows it holds
    these (its read was answered after it gave up on the answer), and no other worker takes
    them, since their holder is alive. By consumer."""
    rows, live = _pending(client, settings)
    out: dict[str, int] = {}
    for r in rows:
        consumer = r["consumer"].decode()
        if consumer.rsplit(":", 1)[0] in live and r["time_since_delivered"] > STUCK_IDLE_MS:
            out[consumer] = out.get(consumer, 0) + 1
    return out


def _stuck_since(client: redis.Redis, settings: Settings) -> dict[str, str]:
    """For each consumer with stuck entries, when they were last handed to it (UTC)."""
    rows, live = _pending(client, settings)
    now = time.time()
    out: dict[str, str] = {}
    for r in rows:
        consumer = r["consumer"].decode()
        if consumer.rsplit(":", 1)[0] in live and r["time_since_delivered"] > STUCK_IDLE_MS:
            at = now - r["time_since_delivered"] / 1000
            out[consumer] = (
                time.strftime("%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}"
            )
    return out


def _settled(client: redis.Redis, settings: Settings) -> bool:
    """Nothing left that the running workers will move: nothing unread, no retry scheduled,
    nothing pending but what is stuck (see :func:`_stuck`)."""
    if client.zcard(settings.keys.retry):
        return False
    stuck = sum(_stuck(client, settings).values())
    return int(client.xlen(settings.keys.stream)) == stuck and (
        int(client.xpending(settings.keys.stream, CONSUMER_GROUP)["pending"]) == stuck
    )


def _account(
    report: SoakReport,
    sandbox: SandboxThread,
    settings: Settings,
    all_ids: set[str],
    bad_ids: set[str],
) -> None:
    delivered = sandbox.state.delivered_ids()
    client = redis.Redis.from_url(settings.redis_url)
    records = [orjson.loads(v) for v in client.hgetall(settings.keys.deadletters).values()]
    dls = {r["id"]: r for r in records}  # the soak's event ids are unique across names
    queued = {f[b"i"].decode() for _, f in client.xrange(settings.keys.stream) if b"i" in f}
    for member in client.zrange(settings.keys.retry, 0, -1):
        queued |= {e["i"] for e in orjson.loads(member)["entries"]}
    client.close()
    report.delivered = len(set(delivered) & all_ids)
    report.dead_lettered = len(dls)
    for record in dls.values():
        report.dead_letter_reasons[record["reason"]] = (
            report.dead_letter_reasons.get(record["reason"], 0) + 1
        )
    report.queued = len(queued - set(delivered) - set(dls))
    report.lost = sorted(all_ids - set(delivered) - set(dls) - queued)
    report.wrongly_dead_lettered = sorted(
        i for i, r in dls.items() if not (i in bad_ids and r["reason"] == "invalid_event")
    )
    report.doomed_not_dead_lettered = sorted(bad_ids - set(dls))
    report.duplicates = sum(delivered.values()) - len(delivered)
    summary = sandbox.state.summary()
    report.requests = summary["requests"]
    report.statuses = summary["statuses"]


def soak_settings(sandbox: SandboxThread, redis_url: str, **overrides: Any) -> Settings:
    """The soak's worker and producer settings: short backoffs and timeouts, no attempt
    cap (the retry budget is the event's time window)."""
    values: dict[str, Any] = {
        "batch_size": 100,
        "retry_base_s": 0.02,
        "retry_cap_s": 0.5,
        "redis_timeout_s": 1.0,
        "claim_idle_s": 2.0,
        "request_timeout_s": 1.5,
        "reprobe_interval_s": 0.2,
    }
    values.update(overrides)
    settings = make_settings(sandbox, redis_url, **values)
    assert settings.max_attempts is None
    return settings


def print_figures(report: SoakReport) -> None:
    f = report.figures()
    print(f"soak: {report.events:,} events in {report.seconds} s, ok={report.ok}")
    print(
        f"  delivered {report.delivered:,}, dead-lettered {report.dead_lettered} "
        f"{report.dead_letter_reasons}, still queued {report.queued}, lost {len(report.lost)}, "
        f"duplicates {report.duplicates}"
    )
    print(
        f"  faults: {report.kills} worker kill -9s, {report.redis_restarts} Redis restarts (AOF), "
        f"{report.client_kills} clients killed, {report.full_refusals} full-Redis refusals "
        f"(+{report.unavailable_refusals} Redis-unavailable refusals), frozen "
        f"{report.freeze_s} s, endpoint outage {report.outage_s} s, slow endpoint "
        f"{report.slow_s} s"
    )
    print(f"  requests {report.requests:,}, statuses {report.statuses}")
    print(f"  phases (s): {report.phases}")
    print(
        f"  recovery after kill -9: normal rate (backlog drain, {report.events and 'all workers'})"
        f" {report.normal_rate} events/s; reclaim rate median {f['reclaim_rate_median']} events/s"
    )
    for r in report.recoveries:
        print(
            f"    kill: {r.events} events held; first reclaimed after "
            f"{r.kill_to_first_reclaim_s} s, all re-sent {r.reclaim_s} s later "
            f"({r.rate} events/s); kill to done {r.kill_to_done_s} s"
        )
    if report.stuck:
        print(
            f"  STUCK: {sum(report.stuck.values())} events pending in live workers that no "
            f"longer work on them (by consumer: {report.stuck}); delivered by a fresh worker "
            f"once those were stopped; handed to them at {report.stuck_since}"
        )
    if report.worker_exits:
        print(f"  WORKER EXITS: {report.worker_exits}")
    if not report.ok:
        print(
            f"  lost {report.lost[:10]}, wrongly dead-lettered {report.wrongly_dead_lettered[:10]}"
            f", doomed not dead-lettered {report.doomed_not_dead_lettered[:10]}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--doomed", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--scale", type=float, default=1.0, help="phase durations x this")
    parser.add_argument("--logs", default=None, help="keep worker logs in this directory")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument(
        "--dense-faults",
        action="store_true",
        help="the old intermittent faults on the request count (shows the key-guard bug)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="capi-soak-") as tmp:
        log_dir = Path(args.logs or tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        (Path(tmp) / "redis").mkdir()
        with RedisProcess(Path(tmp) / "redis", persist=True) as server, SandboxThread() as sb:
            settings = soak_settings(sb, server.url)
            report = soak(
                sb,
                server,
                settings,
                log_dir,
                n_events=args.events,
                workers=args.workers,
                kills=args.kills,
                doomed=args.doomed,
                seed=args.seed,
                phases=Phases().scaled(args.scale),
                dense=args.dense_faults,
            )
    print("command: python -m tests.benchmarks.soak " + " ".join(sys.argv[1:]))
    print_figures(report)
    if args.json:
        print(json.dumps(report.figures(), indent=2))
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
