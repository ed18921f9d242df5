"""The truth while a worker starts: what its startup key checks wait for, in the metrics,
on ``/readyz`` and in ``capi status``.

A startup key check may wait a long time (an endpoint outage is waited out with backoff:
see :mod:`capi.worker.runner`). Meanwhile no sender runs, so nothing else would read the
queue's depth, say that Redis answers, or heartbeat. :class:`StartupWatch` does, every
``EVERY_S``, for the destinations in ``Metrics.starting``: it sets their queue gauges;
and until the lanes run (whose housekeeping does it from then on) it marks Redis up (or
down) and heartbeats the worker as ``starting`` with what it waits for, once a check
waits for something (so that a heartbeat still means "started" on a healthy start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import redis.asyncio as aioredis
import redis.exceptions

from capi.constants import RedisKeys
from capi.metrics import UNDER_WAY, Metrics
from capi.queue import Queue
from capi.redisconn import brief
from capi.trouble import classify

log = logging.getLogger("capi.worker")

EVERY_S = 1.0
# UNDER_WAY (capi.metrics, which readiness reads): what a destination's start waits for
# before its first check has answered. A worker whose checks are only under way does not
# heartbeat yet: one that heartbeats has started, or waits for something it names (the
# endpoint, Redis).
# Destinations whose gauges are read per beat, in turn (a thousand may be starting).
GAUGES_SLICE = 50


class StartupWatch:
    """Keeps a starting worker's metrics and heartbeat true; never ends on an error."""

    def __init__(
        self, metrics: Metrics, redis: aioredis.Redis, keys: RedisKeys, worker: str
    ) -> None:
        self.metrics = metrics
        self.redis = redis
        self.keys = keys
        self.worker = worker
        self.queue = Queue(redis, keys)
        # Whether this watch speaks for the worker (its heartbeat, Redis up): until the lanes
        # run, whose housekeeping does from then on.
        self.alone = True
        self._beaten = False
        self._turn = 0
        self._failing = False

    async def run(self) -> None:
        """Beat every EVERY_S while a destination is starting, until cancelled."""
        while True:
            if self.metrics.starting:
                await self._beat_safely()
            await asyncio.sleep(EVERY_S)

    async def sign_off(self) -> None:
        """Take back this worker's heartbeat (a start that ended without the lanes)."""
        if self._beaten:
            with contextlib.suppress(redis.exceptions.RedisError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.queue.sign_off(self.worker)

    async def _beat_safely(self) -> None:
        try:
            await self._beat()
        except redis.exceptions.RedisError as exc:
            if self.alone:
                self.metrics.redis_up.set(0)
            if not self._failing:
                log.warning("while starting: %s (%s); trying again", classify(exc)[1], brief(exc))
            self._failing = True
        except Exception as exc:  # a bug here must not end the watch, nor pass unsaid
            log.error("while starting: the startup watch failed: %r; it goes on", exc)
        else:
            if self.alone:
                self.metrics.redis_up.set(1)
                self.metrics.redis_answered()
            if self._failing:
                log.warning("while starting: Redis answers again")
            self._failing = False

    async def _beat(self) -> None:
        starting = dict(self.metrics.starting)
        names = list(starting)
        start = self._turn % len(names)
        self._turn = start + GAUGES_SLICE
        now_ms = int(time.time() * 1000)
        for name in (names[start:] + names[:start])[:GAUGES_SLICE]:
            depth, in_flight, oldest_ms, retries = await Queue(
                self.redis, self.keys.for_destination(name)
            ).depth()
            self.metrics.for_destination(name).set_depth(
                depth, in_flight, retries, (now_ms - oldest_ms) / 1000 if oldest_ms else 0.0
            )
        if self.alone and any(why != UNDER_WAY for why in starting.values()):
            detail = "; ".join(
                why if name == "default" else f"{name}: {why}" for name, why in starting.items()
            )
            where = ", ".join(names) if len(names) <= 5 else f"{len(names)} destinations"
            await self.queue.heartbeat(
                self.worker, now_ms, {"state": "starting", "detail": detail, "destination": where}
            )
            self._beaten = True
