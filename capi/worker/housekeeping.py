"""Housekeeping: what a worker does beside sending, on a fixed schedule.

One task per worker (not per destination) ticks every ``TICK_S`` and runs each job that is
due. A job that meets an error of any kind is logged once (see :mod:`capi.trouble`) and
runs again at its next turn; housekeeping itself never ends while the worker runs. Jobs
over destinations touch only those that need it, so a worker configured with a thousand
idle destinations does little more than one with a single destination.

==================  ===============  ====================================================
job                 every            why, and which destinations
==================  ===============  ====================================================
move due retries    tick             retries are due to the millisecond; only the
                                     destinations the retry-due index names as due
heartbeat           HEARTBEAT_S      ``capi status`` shows live workers and their state
                                     within a few seconds of the truth (one per worker,
                                     in a task of its own: nothing delays it)
key state sync      SYNC_S           another worker may have held or released a key:
                                     busy and held destinations, every one each
                                     SYNC_ALL_S (one pipelined round trip)
gauges              GAUGES_S         queue depth and oldest age for metrics: active
                                     destinations, and GAUGES_SLICE idle ones in turn
key re-probe        reprobe interval held destinations only (one worker at a time each,
                                     via a Redis lock), each in a task of its own
endpoint probe      ENDPOINT_PROBE_S destinations whose endpoint is marked failing (by this
                                     worker, or in Redis by any worker, one since stopped
                                     too) and that have nothing left to send (no delivery
                                     would say it answers again), each in a task of its
                                     own: one validate_only request
lease renewal       claim_idle / 4   entries this worker still works on never look idle
reclaim             RECLAIM_S        entries of a stopped worker (no heartbeat for
                                     LIVENESS_S, idle for claim_idle) go back to work:
                                     active destinations, and RECLAIM_SLICE idle ones in
                                     turn (every destination within claim_idle)
lost reads          LOST_S           this worker's own entries whose read answer was lost
                                     (a timeout, a dropped connection) go back to work
                                     once idle for CAPI_REDIS_TIMEOUT_S + 1 s: busy
                                     destinations
forget stopped      FORGET_S, and    consumers that hold nothing of workers without a
                    at once for a    heartbeat (or idle 10 x claim_idle), and heartbeats
                    new destination  of long-gone workers; the retry-due index and
                                     active set are checked too
status log line     STATUS_LOG_S     one line of counters for log-only deployments
prune dead letters  PRUNE_S          retention, and a warning before replay deadlines
index sweep         SWEEP_S          on a Redis Cluster only: flagged destinations back in
                                     the active set, earliest retries in the retry-due
                                     index (capi.index): every destination served
==================  ===============  ====================================================
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import orjson
import redis.exceptions

from capi import clock, deadletters, index, replay
from capi.clock import HEARTBEAT_S, LIVENESS_MS, LIVENESS_S, ms
from capi.deadletters import Unreadable
from capi.redisconn import is_cluster
from capi.status import cluster_memory, destination_status, redis_full
from capi.worker.jobs import Job, Rotation, Schedule

if TYPE_CHECKING:
    from capi.queue import Entry
    from capi.worker.lanes import Lanes
    from capi.worker.sender import Sender

log = logging.getLogger("capi.housekeeping")

TICK_S = 0.1
SYNC_S = 1.0
SYNC_ALL_S = 5.0
GAUGES_S = 2.0
GAUGES_SLICE = 50
RECLAIM_S = 0.5
RECLAIM_SLICE = 25
LOST_S = 1.0
FORGET_S = 60.0
STATUS_LOG_S = 60.0
PRUNE_S = 3600.0
ENDPOINT_PROBE_S = 15.0
DAY_MS = 86_400_000


class Housekeeping:
    """Runs a worker's background jobs until its lanes stop."""

    def __init__(self, lanes: Lanes, *, burst: bool = False) -> None:
        self.lanes = lanes
        self.burst = burst
        self._connected_since: float | None = None
        self._touch_now = False
        self._errors = 0
        self._delay = TICK_S
        settings = lanes.settings
        self.claim_idle_ms = ms(settings.claim_idle_s)
        self.lease_s = max(0.25, settings.claim_idle_s / 4)
        self._reclaim_more: set[str] = set()
        self._reclaim_turn = Rotation()
        self._gauges_turn = Rotation()
        self._prune_turn = Rotation()
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._reprobes: dict[str, Schedule] = {}
        self._endpoint_probes: dict[str, asyncio.Task[None]] = {}
        self._endpoint_schedules: dict[str, Schedule] = {}
        self._forgotten: set[str] = set()
        self._sync_all = Schedule(SYNC_ALL_S)
        # The jobs, in the order a tick runs them; the burst check comes between the two.
        self.jobs = [
            Job("moving due retries", Schedule(0.0), self._move_due),
            Job("key state sync", Schedule(SYNC_S), self._sync_keys),
            Job("gauges", Schedule(GAUGES_S), self._gauges),
            Job("status log", Schedule(STATUS_LOG_S), self._log_status),
            Job("pruning dead letters", Schedule(PRUNE_S, per_destination=True), self._prune),
        ]
        if lanes.keys.cluster:
            self.jobs.append(Job("index sweep", Schedule(index.SWEEP_S), self._sweep))
        self.lease = Job("lease renewal", Schedule(self.lease_s), self._leases)
        self.reclaim = Job("reclaim", Schedule(RECLAIM_S), self._reclaim)
        self.lost = Job("taking back lost reads", Schedule(LOST_S), self._take_back_lost)
        # A read's answer not parsed by now is lost: the call itself has timed out.
        self.lost_idle_ms = ms(settings.redis_timeout_s + settings.batch_wait_ms / 1000) + 1000
        self.forget = Job("forgetting stopped workers", Schedule(FORGET_S), self._forget_all)

    async def run(self) -> None:
        """Tick until the lanes stop; never end on an error. The heartbeat and key
        re-probes run as tasks of their own, so that no slow job (a probe waits for the
        API) can make this worker look stopped to the others."""
        beat = asyncio.create_task(self._beat())
        try:
            await self._ticks()
        finally:
            beat.cancel()
            probes = [*self._probes.values(), *self._endpoint_probes.values()]
            for task in probes:
                task.cancel()
            await asyncio.gather(beat, *probes, return_exceptions=True)

    async def _beat(self) -> None:
        while not self.lanes.stopping:
            await self._job("heartbeat", self._heartbeat)
            await asyncio.sleep(HEARTBEAT_S * (0.9 + random.random() / 5))

    async def _ticks(self) -> None:
        lanes = self.lanes
        while not lanes.stopping:
            self._errors = 0
            sent = lanes.trouble.now()
            try:
                await self.tick()
            except Exception as exc:  # tick's own bookkeeping; the jobs catch their own
                self._failed(exc, "housekeeping")
            if self._errors == 0:
                lanes.trouble.ok(sent=sent)
                lanes.metrics.redis_up.set(1)
                if self._connected_since is None:
                    self._connected_since = time.monotonic()
                    self._touch_now = True
            if lanes.trouble.redis_ok:
                lanes.metrics.redis_answered()
            # Jittered, so that workers meeting the same trouble do not tick in lockstep.
            await asyncio.sleep(
                (self._delay if self._errors else TICK_S) * (0.75 + random.random() / 2)
            )

    def _failed(self, exc: BaseException, job: str) -> None:
        lanes = self.lanes
        trouble = lanes.trouble
        self._errors += 1
        self._delay = min(trouble.failed(exc, job), 1.0)
        if job == "heartbeat" or trouble.kind in ("unreachable", "loading"):
            # Others may not have been able to say they are alive either: take nothing
            # over until this worker's own heartbeat has worked for LIVENESS_S again.
            self._connected_since = None
        if not trouble.redis_ok:
            lanes.metrics.redis_up.set(0)
            if trouble.kind == "full":
                lanes.metrics.redis_full.set(1)

    async def _job(
        self, name: str, step: Callable[[], Awaitable[object]], sender: Sender | None = None
    ) -> bool:
        """Run one job; an error is recorded (and logged once), never raised."""
        try:
            await step()
        except Exception as exc:
            self._failed(exc, name)
            if sender is not None and "NOGROUP" in str(exc):
                await sender.recreate_group()
            return False
        return True

    async def tick(self) -> None:
        """Run every job that is due; each job's error is its own."""
        lanes = self.lanes
        senders = dict(lanes.senders)
        now_ms = clock.now_ms(lanes.clock)
        for job in self.jobs:
            if job.schedule.due(len(senders)):
                await self._job(job.name, functools.partial(job.run, senders, now_ms))
        if self.burst and await self._drained():
            log.info("burst: nothing queued, in flight or scheduled; stopping")
            lanes.stop()
            return
        await self._destination_jobs(senders)

    async def _destination_jobs(self, senders: dict[str, Sender]) -> None:
        """The jobs that look after destinations' keys and entries in flight."""
        for s in senders.values():
            name = s.destination.name
            if name in self._probes or not s.held:
                continue
            schedule = self._reprobes.setdefault(name, Schedule(self._reprobe_s(s)))
            if schedule.due():
                self._probes[name] = asyncio.create_task(self._reprobe(s))
        for s in senders.values():
            name = s.destination.name
            if name in self._endpoint_probes or s.held:
                continue
            schedule = self._endpoint_schedules.setdefault(name, Schedule(ENDPOINT_PROBE_S))
            if schedule.due():
                self._endpoint_probes[name] = asyncio.create_task(self._probe_endpoint(s))
        now_ms = clock.now_ms(self.lanes.clock)
        await self._forget_new(senders)
        for job in (self.lease, self.reclaim, self.lost, self.forget):
            if (job is self.lease and self._touch_now) or job.schedule.due():
                ok = await self._job(job.name, functools.partial(job.run, senders, now_ms))
                if job is self.lease:
                    self._touch_now = not ok

    async def _reprobe(self, s: Sender) -> None:
        """Re-probe a held key (at most one worker per interval: a lock in Redis)."""
        name = s.destination.name
        try:
            released: list[bool] = []

            async def probe() -> None:
                released.append(await s.try_release())

            if await self._job("key re-probe", probe, s) and all(released):
                self.lanes.activate(name)
        finally:
            del self._probes[name]

    async def _probe_endpoint(self, s: Sender) -> None:
        """Ask a failing endpoint whether it answers again, while its destination has
        nothing left to send (see :meth:`Sender.probe_endpoint`)."""
        try:
            await self._job("endpoint probe", s.probe_endpoint, s)
        finally:
            del self._endpoint_probes[s.destination.name]

    @staticmethod
    def _reprobe_s(sender: Sender) -> float:
        return min(sender.settings.reprobe_interval_s, 5.0)

    def _busy(self, senders: dict[str, Sender], *, held: bool = False) -> Iterable[Sender]:
        """The senders with work (and, with ``held``, the held ones)."""
        for name, s in senders.items():
            if name in self.lanes.active or s.holding or (held and s.held):
                yield s

    async def _prune(self, senders: dict[str, Sender], now_ms: int) -> None:
        """Prune the dead letters of the next destination in turn (each within PRUNE_S)."""
        for s in self._prune_turn.take(senders, 1):
            await self._job(
                "pruning dead letters", functools.partial(prune_dead_letters, s, now_ms), s
            )

    async def _move_due(self, senders: dict[str, Sender], now_ms: int) -> None:
        due = await self.lanes.redis.zrangebyscore(self.lanes.keys.retry_due, "-inf", now_ms)
        for raw in due:
            s = senders.get(raw.decode())
            if s is None:
                continue
            if await s.queue.move_due_retries(now_ms):
                self.lanes.activate(s.destination.name)

    async def _sweep(self, senders: dict[str, Sender], now_ms: int) -> None:
        for name in await index.sweep(self.lanes.redis, [s.keys for s in senders.values()]):
            self.lanes.activate(name)

    async def _heartbeat(self) -> None:
        lanes = self.lanes
        state, detail, where = lanes.state()
        await lanes.queue.heartbeat(
            lanes.name,
            clock.now_ms(),
            {"state": state, "detail": detail, "destination": where},
        )

    async def _sync_keys(self, senders: dict[str, Sender], now_ms: int) -> None:
        # Every destination's key state at times; the busy and held ones' each time.
        if not self._sync_all.due():
            senders = {s.destination.name: s for s in self._busy(senders, held=True)}
        if not senders:
            return
        pipe = self.lanes.redis.pipeline(transaction=False)
        for s in senders.values():
            pipe.hget(s.keys.key_state, "state")
        states = await pipe.execute()
        for s, state in zip(senders.values(), states, strict=True):
            await s.adopt_key_state(state)

    async def _log_status(self, senders: dict[str, Sender], now_ms: int) -> None:
        shown = list(self._busy(senders))[:20] or list(senders.values())[:1]
        for s in shown:
            status = await destination_status(s.redis, s.keys)
            log.info(
                "status of %s: %s",
                s.destination.name,
                orjson.dumps(status).decode(),
                extra={"destination": s.destination.name},
            )

    async def _leases(self, senders: dict[str, Sender], now_ms: int) -> None:
        for s in senders.values():
            for consumer, ids in s.leases().items():
                await s.queue.touch(consumer, ids)

    async def _reclaim(self, senders: dict[str, Sender], now_ms: int) -> None:
        # After an outage, give every worker time to say it is alive before taking anything.
        connected = self._connected_since
        if connected is None or time.monotonic() - connected < LIVENESS_S:
            return
        lanes = self.lanes
        live = await lanes.queue.live_workers(clock.now_ms(), LIVENESS_MS)
        live.add(lanes.name)
        todo = {s.destination.name: s for s in self._busy(senders)}
        todo.update(
            (s.destination.name, s) for s in self._reclaim_turn.take(senders, RECLAIM_SLICE)
        )
        todo.update((n, senders[n]) for n in self._reclaim_more if n in senders)
        self._reclaim_more.clear()
        for s in todo.values():
            await self._job("reclaim", functools.partial(self._reclaim_one, s, live), s)

    async def _reclaim_one(self, s: Sender, live: set[str]) -> None:
        me = self.lanes.name
        more = await self._take_over_while_room(
            s,
            lambda: s.queue.reclaim(
                f"{me}:reclaim",
                self.claim_idle_ms,
                s.settings.batch_size,
                live,
                me=me,
                mine=s.held_ids(),
            ),
            "reclaimed %d pending events of %s no live worker holds (a stopped worker's, "
            "or read with the answer lost)",
        )
        if not more:
            return
        # More may be waiting: look again at the next tick, not in RECLAIM_S, so taken-over
        # events are re-sent as fast as the lanes send, not as fast as this job wakes.
        self._reclaim_more.add(s.destination.name)
        self.reclaim.schedule.now_again()

    async def _take_back_lost(self, senders: dict[str, Sender], now_ms: int) -> None:
        """Entries this worker's own reads took whose answer was lost (a timeout, or a
        connection dropped under a call that was then sent again): back to work within
        seconds, not after claim_idle."""
        for s in self._busy(senders):
            await self._job("taking back lost reads", functools.partial(self._lost_one, s), s)

    async def _lost_one(self, s: Sender) -> None:
        me = self.lanes.name
        await self._take_over_while_room(
            s,
            lambda: s.queue.reclaim_lost(
                f"{me}:reclaim", me, s.held_ids(), self.lost_idle_ms, s.settings.batch_size
            ),
            "took back %d events of %s whose read answer was lost",
        )

    async def _take_over_while_room(
        self, s: Sender, claim: Callable[[], Awaitable[list[Entry]]], said: str
    ) -> bool:
        """Claim entries for ``s`` a batch at a time while it has room, handing each batch to
        it (``said`` logs how many, of which destination); True when the last batch was full,
        so more may be waiting."""
        name = s.destination.name
        while s.reclaim_room():
            claimed = await claim()
            if not claimed:
                return False
            log.warning(
                said, len(claimed), name, extra={"count": len(claimed), "destination": name}
            )
            s.take_over(claimed)
            self.lanes.activate(name)
            if len(claimed) < s.settings.batch_size:
                return False
        return True

    async def _forget_all(self, senders: dict[str, Sender], now_ms: int) -> None:
        await self._forget_some(list(senders.values()))

    async def _forget_new(self, senders: dict[str, Sender]) -> None:
        """A destination this worker just began to serve is looked after at once (a
        replacement worker cleans up after a kill storm without waiting FORGET_S)."""
        new = [s for name, s in senders.items() if name not in self._forgotten]
        if new:
            await self._forget_some(new)

    async def _forget_some(self, senders: list[Sender]) -> None:
        live = await self.lanes.queue.live_workers(clock.now_ms(), LIVENESS_MS)
        live.add(self.lanes.name)
        for s in senders:
            step = functools.partial(self._forget, s, live)
            if await self._job("forgetting stopped workers", step, s):
                self._forgotten.add(s.destination.name)

    async def _forget(self, s: Sender, live: set[str]) -> None:
        await s.queue.forget_stopped(
            clock.now_ms(), self.claim_idle_ms * 10, live=live, silent_ms=LIVENESS_MS
        )
        # Checks of the indexes (should Redis ever have lost part of them): the next read
        # finds out whether the stream is empty.
        await s.queue.index_retries()
        self.lanes.activate(s.destination.name)

    async def _gauges(self, senders: dict[str, Sender], now_ms: int) -> None:
        todo = {s.destination.name: s for s in self._busy(senders)}
        todo.update((s.destination.name, s) for s in self._gauges_turn.take(senders, GAUGES_SLICE))
        for s in todo.values():
            await s.refresh_gauges(now_ms)
        try:
            if is_cluster(self.lanes.redis):  # full: any master is
                _, shards = await cluster_memory(self.lanes.redis)
                full = any(shard["full"] for shard in shards)
            else:
                full = redis_full(await self.lanes.redis.info("memory"))
        except redis.exceptions.ResponseError:  # INFO may be denied to capi's Redis user
            return
        self.lanes.metrics.redis_full.set(1 if full else 0)

    async def _drained(self) -> bool:
        """Whether every destination that can send has nothing queued, in flight or
        scheduled (a held destination's events stay queued, and are said to). Never once a
        sender was taken off: a burst worker does so only as it stops, with its events left
        queued (with no sender left, "every destination" would be none)."""
        if self.lanes.starting or self._errors or self.lanes.removed:
            return False
        # The senders now, not the tick's: one that started while the tick's jobs ran is
        # no longer counted as starting, and must be counted as served.
        senders = self.lanes.senders
        sendable = [s for s in senders.values() if not s.held]
        if any(s.holding for s in sendable):
            return False
        for s in sendable:
            if not await s.queue.drained():
                return False
        held = [name for name, s in senders.items() if s.held]
        if held:
            log.warning("burst: held (key broken), their events stay queued: %s", ", ".join(held))
        return True


LOGGED_IDS = 100  # a warning names at most this many event ids (its count says how many)


async def prune_dead_letters(sender: Sender, now: int) -> None:
    """Warn about dead letters nearing their replay deadline; prune those past retention.

    The records are read a slice at a time (:func:`capi.deadletters.scan`): a destination
    with 50,000 dead letters costs the worker a slice, not all of them at once."""
    settings = sender.settings
    retention_ms = int(settings.deadletter_retention_days * DAY_MS)
    unreadable: list[Unreadable] = []
    soon = 0
    soon_ids: list[str] = []
    old: list[str] = []
    old_ids: list[str] = []
    source = [(sender.keys.destination, sender.keys)]
    async for r in deadletters.scan(sender.redis, source, unreadable=unreadable):
        if r.dead_lettered_ms + retention_ms <= now:
            old.append(r.key)  # keys only: purged in slices once read
            if len(old_ids) < LOGGED_IDS:
                old_ids.append(r.id)
        if replay.can_replay(r, now) and r.replay_deadline_ms - now < DAY_MS:
            soon += 1
            if len(soon_ids) < LOGGED_IDS:
                soon_ids.append(r.id)
    if unreadable:
        log.warning(
            "skipped %d dead letters that cannot be read (see `capi dead-letters show KEY`): %s",
            len(unreadable),
            ", ".join(f"{u.key} ({u.why})" for u in unreadable[:20]),
        )
    if soon:
        log.warning(
            "%d dead letters pass their replay deadline within 24 h; replay or export them",
            soon,
            extra={"event_ids": soon_ids},
        )
    if old:
        await replay.purge_keys(sender.redis, sender.keys, old)  # in slices
        log.warning(
            "pruned %d dead letters older than CAPI_DEADLETTER_RETENTION_DAYS=%g",
            len(old),
            settings.deadletter_retention_days,
            extra={"event_ids": old_ids, "count": len(old)},
        )
