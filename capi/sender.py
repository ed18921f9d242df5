"""The sender: reads queued events in batches, POSTs them, and gives each event its fate.

One :class:`Sender` runs in each worker process with ``concurrency`` lanes. Each lane reads
up to ``batch_size`` entries from the stream through the consumer group (waiting at most
``batch_wait_ms`` to fill a batch), drops events already outside the API's time window into
dead letters, and sends the rest. Then, per event:

- accepted: acknowledged;
- rejected at ``events[i]``: that event is dead-lettered, the rest resent at once; with no
  index the batch is bisected until the bad events are isolated;
- key problem: the :class:`~capi.keyguard.KeyGuard` re-probes; transient -> retry,
  confirmed -> dead-letter this batch and hold every worker; already held -> hand back;
- retryable (429, 5xx, network): scheduled for retry with capped jittered backoff, or
  dead-lettered as retries_exhausted once ``max_attempts`` sends failed;
- anything else: dead-lettered with the raw response.

A housekeeping task moves due retries back to the stream, reclaims entries of crashed
workers (``XAUTOCLAIM`` after ``claim_idle_s``), re-probes a held key, keeps a heartbeat,
and in burst mode stops the sender once nothing is queued, in flight or scheduled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from capi.client import ConversionsClient, build_body
from capi.constants import API_MAX_AGE_MS, API_MAX_BODY_BYTES
from capi.errors import InvalidEventError, SendError
from capi.events import Clock
from capi.failures import Reason
from capi.fates import Fates
from capi.keyguard import KeyGuard, Verdict
from capi.metrics import Metrics
from capi.queue import Entry, Queue
from capi.settings import Settings

log = logging.getLogger("capi.sender")

# An event this close to the API's 7-day limit is not sent: it would arrive too old.
STALE_MARGIN_MS = 60_000
_IDLE_BLOCK_MS = 500
_TICK_S = 0.1


class Sender:
    """Sends queued events in batches until stopped (or, in burst mode, until drained)."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        client: ConversionsClient,
        *,
        name: str | None = None,
        clock: Clock = time.time,
        rand: Callable[[], float] = random.random,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.redis = redis
        self.client = client
        self.queue = Queue(redis, settings.keys)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.clock = clock
        api_key, _ = settings.credentials()
        self.guard = KeyGuard(
            client,
            redis,
            settings.keys,
            api_key=api_key,
            confirmations=settings.probe_confirmations,
            reprobe_interval_s=settings.reprobe_interval_s,
            min_probe_interval_s=min(5.0, settings.reprobe_interval_s),
            probe_pause_s=min(0.5, settings.reprobe_interval_s),
        )
        self._stopping = asyncio.Event()
        self._inflight: dict[bytes, Entry] = {}
        self.fates = Fates(
            settings,
            redis,
            self.queue,
            client,
            self.metrics,
            api_key=api_key,
            clock=clock,
            rand=rand,
        )

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Sender:
        """A sender with its own Redis pool and HTTP client (closed by :meth:`aclose`)."""
        api_key, pixel_id = settings.credentials()
        client = ConversionsClient(
            base_url=settings.base_url,
            api_key=api_key,
            pixel_id=pixel_id,
            timeout_s=settings.request_timeout_s,
            integration_source=settings.integration_source,
        )
        return cls(settings, aioredis.Redis.from_url(settings.redis_url), client, **kwargs)

    async def aclose(self) -> None:
        """Close the HTTP client and the Redis pool."""
        await self.client.aclose()
        await self.redis.aclose()

    # -- lifecycle -------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the sender to stop reading; in-flight batches finish."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._stopping.is_set()

    async def run(self, *, burst: bool = False) -> None:
        """Send until stopped; with ``burst``, stop once everything has a fate."""
        await self.queue.ensure_group()
        await self.guard.sync()
        self.metrics.key_ok.set(0 if self.guard.held else 1)
        lanes = [asyncio.create_task(self._lane(i)) for i in range(self.settings.concurrency)]
        house = asyncio.create_task(self._housekeeping(burst))
        try:
            await self._stopping.wait()
            _, pending = await asyncio.wait(lanes, timeout=self.settings.shutdown_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            house.cancel()
            await asyncio.gather(house, return_exceptions=True)
            for task in lanes:
                task.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)
            await self._hand_back_inflight()

    async def _hand_back_inflight(self) -> None:
        if self._inflight:
            entries = list(self._inflight.values())
            self._inflight.clear()
            log.warning("handing %d in-flight events back to the queue", len(entries))
            await self.queue.hand_back(entries)

    # -- lanes -----------------------------------------------------------------------
    async def _lane(self, index: int) -> None:
        consumer = f"{self.name}:{index}"
        while not self.stopping:
            if self.guard.held:
                await asyncio.sleep(_TICK_S)
                continue
            try:
                entries = await self._read_batch(consumer)
                if entries:
                    await self.process(entries)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                log.warning("Redis unavailable (%s); retrying in 1 s", exc)
                await asyncio.sleep(1.0)

    async def _read_batch(self, consumer: str) -> list[Entry]:
        size = self.settings.batch_size
        entries = await self.queue.read(consumer, size, _IDLE_BLOCK_MS)
        wait_s = self.settings.batch_wait_ms / 1000
        deadline = time.monotonic() + wait_s
        while entries and len(entries) < size and not self.stopping:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            more = await self.queue.read(consumer, size - len(entries), remaining_ms)
            if not more:
                break
            entries += more
        return entries

    async def process(self, entries: Sequence[Entry]) -> None:
        """Give every entry of a batch its fate."""
        for e in entries:
            self._inflight[e.stream_id] = e
        limit = self._now() - API_MAX_AGE_MS + STALE_MARGIN_MS
        stale = [e for e in entries if e.timestamp_ms < limit]
        if stale:
            await self._dead_letter(stale, Reason.OUTSIDE_TIME_WINDOW, None, attempted=False)
        fresh = [e for e in entries if e.timestamp_ms >= limit]
        for chunk in _by_size(fresh, API_MAX_BODY_BYTES - 1024):
            await self._send(chunk)

    async def _send(self, entries: list[Entry]) -> None:
        work = [entries]
        while work:
            group = work.pop()
            body = build_body(
                [e.event for e in group], integration_source=self.settings.integration_source
            )
            started = time.perf_counter()
            try:
                accepted = await self.client.send_body(body)
            except InvalidEventError as err:
                self.metrics.send_latency.observe(time.perf_counter() - started)
                work.extend(await self._split(group, err))
                continue
            except SendError as err:
                self.metrics.send_latency.observe(time.perf_counter() - started)
                await self._failed(group, err)
                continue
            await self.fates.delivered(group, accepted)
            self._done(group)

    async def _split(self, group: list[Entry], err: InvalidEventError) -> list[list[Entry]]:
        index = err.event_index
        if index is not None and 0 <= index < len(group):
            await self._dead_letter([group[index]], err.reason, err)
            rest = group[:index] + group[index + 1 :]
            return [rest] if rest else []
        if len(group) == 1:
            await self._dead_letter(group, err.reason, err)
            return []
        middle = len(group) // 2
        return [group[middle:], group[:middle]]

    async def _failed(self, group: list[Entry], err: SendError) -> None:
        if err.reason.key_problem:
            verdict = await self.guard.confirm(err)
            self.metrics.key_ok.set(0 if self.guard.held else 1)
            if verdict is Verdict.TRANSIENT:
                self.metrics.transient_key_failures.labels(err.reason.value).inc()
                await self._retry(group, err)
            elif verdict is Verdict.CONFIRMED:
                await self._dead_letter(group, err.reason, err)
            else:
                await self.queue.hand_back(group)
                self._done(group)
        elif err.reason.retryable:
            await self._retry(group, err)
        else:
            await self._dead_letter(group, err.reason, err)

    async def _retry(self, group: list[Entry], err: SendError) -> None:
        await self.fates.retry(group, err)
        self._done(group)

    async def _dead_letter(
        self,
        group: Sequence[Entry],
        reason: Reason,
        err: SendError | None,
        *,
        attempted: bool = True,
    ) -> None:
        await self.fates.dead_letter(group, reason, err, attempted=attempted)
        self._done(group)

    def _done(self, group: Sequence[Entry]) -> None:
        for e in group:
            self._inflight.pop(e.stream_id, None)

    def _now(self) -> int:
        return int(self.clock() * 1000)

    # -- housekeeping ----------------------------------------------------------------
    async def _housekeeping(self, burst: bool) -> None:
        last: dict[str, float] = {}

        def due(task: str, every_s: float) -> bool:
            now = time.monotonic()
            if now - last.get(task, float("-inf")) >= every_s:
                last[task] = now
                return True
            return False

        claim_idle_ms = int(self.settings.claim_idle_s * 1000)
        while not self.stopping:
            try:
                await self._housekeeping_tick(due, claim_idle_ms, burst)
                self.metrics.tick(redis_ok=True)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                self.metrics.tick(redis_ok=False)
                log.warning("Redis unavailable in housekeeping (%s)", exc)
            await asyncio.sleep(_TICK_S)

    async def _housekeeping_tick(
        self, due: Callable[[str, float], bool], claim_idle_ms: int, burst: bool
    ) -> None:
        await self.queue.move_due_retries(self._now())
        if due("sync", 1.0):
            await self.guard.sync()
            self.metrics.key_ok.set(0 if self.guard.held else 1)
        if due("gauges", 2.0):
            await self._update_gauges()
        if burst and not self._inflight and await self.queue.drained():
            log.info("burst: nothing queued, in flight or scheduled; stopping")
            self.stop()
            return
        if self.guard.held:
            if due("reprobe", min(self.settings.reprobe_interval_s, 5.0)):
                await self.guard.try_release()
            return
        if due("heartbeat", 5.0):
            await self.queue.heartbeat(self.name)
        if due("reclaim", max(0.2, min(self.settings.claim_idle_s / 4, 15.0))):
            claimed = await self.queue.reclaim(
                f"{self.name}:reclaim", claim_idle_ms, self.settings.batch_size
            )
            if claimed:
                log.warning("reclaimed %d events left by a stopped worker", len(claimed))
                await self.process(claimed)
            await self.queue.forget_idle_consumers(claim_idle_ms * 10)

    async def _update_gauges(self) -> None:
        depth, in_flight, oldest_ms, retries = await self.queue.depth()
        self.metrics.queue_depth.set(depth)
        self.metrics.in_flight.set(in_flight)
        self.metrics.retries_scheduled.set(retries)
        self.metrics.oldest_age.set(max(0.0, (self._now() - oldest_ms) / 1000) if oldest_ms else 0)


def _by_size(entries: list[Entry], limit: int) -> list[list[Entry]]:
    chunks: list[list[Entry]] = []
    current: list[Entry] = []
    size = 0
    for e in entries:
        if current and size + len(e.event) + 1 > limit:
            chunks.append(current)
            current, size = [], 0
        current.append(e)
        size += len(e.event) + 1
    if current:
        chunks.append(current)
    return chunks
