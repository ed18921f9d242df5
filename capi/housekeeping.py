"""Housekeeping: what a worker does beside sending, on a fixed schedule.

One task per worker ticks every ``TICK_S`` and runs each job that is due. A job that meets
an error of any kind is logged once (see :mod:`capi.trouble`) and runs again at its next
turn; housekeeping itself never ends while the worker runs.

=================  ===============  =====================================================
job                every            why
=================  ===============  =====================================================
move due retries   tick             retries are due to the millisecond
heartbeat          HEARTBEAT_S      ``capi status`` shows live workers and their state
                                    within a few seconds of the truth
key state sync     SYNC_S           another worker may have held or released the key
gauges             GAUGES_S         queue depth, oldest age, Redis memory for metrics
key re-probe       reprobe interval while held (one worker at a time, via a Redis lock)
lease renewal      claim_idle / 4   entries this worker still works on never look idle
reclaim            RECLAIM_S        entries of a stopped worker (no heartbeat for
                                    LIVENESS_S, idle for claim_idle) go back to work
forget stopped     FORGET_S         consumers and heartbeats of long-gone workers
status log line    STATUS_LOG_S     one line of counters for log-only deployments
prune dead letters PRUNE_S          retention, and a warning before replay deadlines
=================  ===============  =====================================================
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson
import redis.exceptions

from capi import replay
from capi.deadletters import Unreadable
from capi.status import gather, redis_full

if TYPE_CHECKING:
    from capi.sender import Sender

log = logging.getLogger("capi.housekeeping")

TICK_S = 0.1
HEARTBEAT_S = 1.0
# A worker silent this long is taken for stopped (status, and reclaiming its entries).
LIVENESS_S = 10.0
SYNC_S = 1.0
GAUGES_S = 2.0
RECLAIM_S = 0.5
FORGET_S = 60.0
STATUS_LOG_S = 60.0
PRUNE_S = 3600.0
DAY_MS = 86_400_000


class Housekeeping:
    """Runs a sender's background jobs until the sender stops."""

    def __init__(self, sender: Sender, *, burst: bool = False) -> None:
        self.sender = sender
        self.burst = burst
        self._last: dict[str, float] = {}
        self._connected_since: float | None = None
        self._touch_now = False
        self._errors = 0
        self._delay = TICK_S
        settings = sender.settings
        self.claim_idle_ms = int(settings.claim_idle_s * 1000)
        self.lease_s = max(0.25, settings.claim_idle_s / 4)

    def _due(self, job: str, every_s: float) -> bool:
        now = time.monotonic()
        if now - self._last.get(job, float("-inf")) >= every_s:
            self._last[job] = now
            return True
        return False

    async def run(self) -> None:
        """Tick until the sender stops; never end on an error."""
        s = self.sender
        while not s.stopping:
            self._errors = 0
            try:
                await self.tick()
            except Exception as exc:  # tick's own bookkeeping; the jobs catch their own
                self._failed(exc, "housekeeping")
            if self._errors == 0:
                s.trouble.ok()
                s.metrics.redis_up.set(1)
                if self._connected_since is None:
                    self._connected_since = time.monotonic()
                    self._touch_now = True
            s.metrics.tick(redis_ok=s.trouble.redis_ok)
            # Jittered, so that workers meeting the same trouble do not tick in lockstep.
            await asyncio.sleep(
                (self._delay if self._errors else TICK_S) * (0.75 + random.random() / 2)
            )

    def _failed(self, exc: BaseException, job: str) -> None:
        s = self.sender
        self._errors += 1
        self._delay = min(s.trouble.failed(exc, job), 1.0)
        if job == "heartbeat" or s.trouble.kind in ("unreachable", "loading"):
            # Others may not have been able to say they are alive either: take nothing
            # over until this worker's own heartbeat has worked for LIVENESS_S again.
            self._connected_since = None
        if not s.trouble.redis_ok:
            s.metrics.redis_up.set(0)
            if s.trouble.kind == "full":
                s.metrics.redis_full.set(1)

    async def _job(self, name: str, step: Callable[[], Awaitable[object]]) -> bool:
        """Run one job; an error is recorded (and logged once), never raised."""
        try:
            await step()
        except Exception as exc:
            self._failed(exc, name)
            if "NOGROUP" in str(exc):
                await self.sender._recreate_group()
            return False
        return True

    async def tick(self) -> None:
        """Run every job that is due; each job's error is its own."""
        s = self.sender
        now_ms = int(s.clock() * 1000)
        await self._job("moving due retries", lambda: s.queue.move_due_retries(now_ms))
        if self._due("heartbeat", HEARTBEAT_S):
            await self._job("heartbeat", self._heartbeat)
        if self._due("sync", SYNC_S) and await self._job("key state sync", s.guard.sync):
            s.metrics.key_ok.set(0 if s.guard.held else 1)
        if self._due("gauges", GAUGES_S):
            await self._job("gauges", lambda: self._gauges(now_ms))
        if self._due("status_log", STATUS_LOG_S):
            await self._job("status log", self._log_status)
        if self._due("prune", PRUNE_S):
            await self._job("pruning dead letters", lambda: prune_dead_letters(s, now_ms))
        idle = not s.in_flight and not s.reclaimed and self._errors == 0
        if self.burst and idle and await s.queue.drained():
            log.info("burst: nothing queued, in flight or scheduled; stopping")
            s.stop()
            return
        if s.guard.held:
            if self._due("reprobe", min(s.settings.reprobe_interval_s, 5.0)):
                await self._job("key re-probe", s.guard.try_release)
            return
        if self._touch_now or self._due("lease", self.lease_s):
            self._touch_now = not await self._job("lease renewal", self._renew_leases)
        if self._due("reclaim", RECLAIM_S):
            await self._job("reclaim", self._reclaim)
        if self._due("forget", FORGET_S):
            await self._job(
                "forgetting stopped workers",
                lambda: s.queue.forget_stopped(int(time.time() * 1000), self.claim_idle_ms * 10),
            )

    async def _heartbeat(self) -> None:
        s = self.sender
        state, detail = s.state()
        await s.queue.heartbeat(
            s.name,
            int(time.time() * 1000),
            {"state": state, "detail": detail, "destination": s.destination.name},
        )

    async def _log_status(self) -> None:
        status = await gather(self.sender.redis, self.sender.keys)
        log.info("status: %s", orjson.dumps(status).decode())

    async def _renew_leases(self) -> None:
        for consumer, ids in self.sender.leases().items():
            await self.sender.queue.touch(consumer, ids)

    async def _reclaim(self) -> None:
        s = self.sender
        # After an outage, give every worker time to say it is alive before taking anything.
        connected = self._connected_since
        if connected is None or time.monotonic() - connected < LIVENESS_S:
            return
        live = await s.queue.live_workers(int(time.time() * 1000), int(LIVENESS_S * 1000))
        live.add(s.name)
        size = s.settings.batch_size
        while len(s.reclaimed) < s.settings.concurrency * 4:
            claimed = await s.queue.reclaim(
                f"{s.name}:reclaim",
                self.claim_idle_ms,
                size,
                live,
                me=s.name,
                mine=s.held_ids(),
            )
            if not claimed:
                return
            log.warning(
                "reclaimed %d pending events no live worker holds (a stopped worker's, or "
                "read with the answer lost)",
                len(claimed),
                extra={"count": len(claimed)},
            )
            s.reclaimed.append(claimed)
            if len(claimed) < size:
                return
        # More may be waiting: look again at the next tick, not in RECLAIM_S, so taken-over
        # events are re-sent as fast as the lanes send, not as fast as this job wakes.
        self._last.pop("reclaim", None)

    async def _gauges(self, now_ms: int) -> None:
        s = self.sender
        depth, in_flight, oldest_ms, retries = await s.queue.depth()
        m = s.metrics
        m.queue_depth.set(depth)
        m.in_flight.set(in_flight)
        m.retries_scheduled.set(retries)
        m.oldest_age.set(max(0.0, (now_ms - oldest_ms) / 1000) if oldest_ms else 0)
        try:
            memory = await s.redis.info("memory")
        except redis.exceptions.ResponseError:  # INFO may be denied to capi's Redis user
            return
        m.redis_full.set(1 if redis_full(memory) else 0)


async def prune_dead_letters(sender: Sender, now: int) -> None:
    """Warn about dead letters nearing their replay deadline; prune those past retention."""
    settings = sender.settings
    retention_ms = int(settings.deadletter_retention_days * DAY_MS)
    unreadable: list[Unreadable] = []
    selection = replay.Selection()
    records = await replay.select(sender.redis, sender.keys, selection, now, unreadable)
    if unreadable:
        log.warning(
            "skipped %d dead letters that cannot be read (see `capi dead-letters show KEY`): %s",
            len(unreadable),
            ", ".join(f"{u.key} ({u.why})" for u in unreadable[:20]),
        )
    old = [r for r in records if r.dead_lettered_ms + retention_ms <= now]
    soon = [r for r in records if replay.can_replay(r, now) and r.replay_deadline_ms - now < DAY_MS]
    if soon:
        log.warning(
            "%d dead letters pass their replay deadline within 24 h; replay or export them",
            len(soon),
            extra={"event_ids": [r.id for r in soon]},
        )
    if old:
        await replay.purge(sender.redis, sender.keys, old)
        log.warning(
            "pruned %d dead letters older than CAPI_DEADLETTER_RETENTION_DAYS=%g",
            len(old),
            settings.deadletter_retention_days,
            extra={"event_ids": [r.id for r in old], "count": len(old)},
        )
