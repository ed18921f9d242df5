"""Recording an event's fate: the Redis write (atomic with the acknowledgement), the metric,
and one log line with event ids and request ids. :mod:`capi.worker.sender` decides; this records.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis
import redis.exceptions

from capi import deadletters
from capi._aio import aw
from capi.client import Accepted, ConversionsClient
from capi.constants import API_MAX_AGE_MS, STALE_MARGIN_MS
from capi.errors import SendError
from capi.events import Clock
from capi.failures import Reason
from capi.guidance import diagnose
from capi.metrics import DestinationMetrics
from capi.queue import Entry, Queue
from capi.retry import backoff_s, within_budget
from capi.settings import Settings

log = logging.getLogger("capi.sender")


class Fates:
    """Writes deliveries, retries and dead letters, and counts and logs each."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        queue: Queue,
        client: ConversionsClient,
        metrics: DestinationMetrics,
        *,
        api_key: str,
        clock: Clock = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.queue = queue
        self.client = client
        self.metrics = metrics
        self._api_key = api_key
        self.clock = clock
        self.rand = rand

    def now_ms(self) -> int:
        """The clock's time in Unix milliseconds."""
        return int(self.clock() * 1000)

    async def delivered(self, group: Sequence[Entry], accepted: Accepted) -> int | None:
        """Acknowledge a delivered batch; if this ends an endpoint outage, since when (ms)."""
        recovered = await self.queue.deliver(group, self.now_ms())
        if accepted.accepted_events is not None and accepted.accepted_events != len(group):
            await self._accepted_mismatch(group, accepted)
        self.metrics.delivered.inc(len(group))
        self.metrics.batch_size.observe(len(group))
        self.metrics.send_latency.observe(accepted.elapsed_s)
        log.info(
            "delivered %d events",
            len(group),
            extra={
                "destination": self.queue.keys.destination,
                "count": len(group),
                "first_id": group[0].event_id,
                "last_id": group[-1].event_id,
                "request_id": next(iter(accepted.request_ids.values()), None),
                "latency_ms": round(accepted.elapsed_s * 1000, 1),
            },
        )
        return recovered

    async def _accepted_mismatch(self, group: Sequence[Entry], accepted: Accepted) -> None:
        """The docs promise all-or-nothing batches: a 200 counting otherwise is news."""
        with contextlib.suppress(redis.exceptions.RedisError):  # a count must not block a fate
            await aw(self.redis.hincrby(self.queue.keys.stats, "accepted_mismatches", 1))
        self.metrics.accepted_mismatches.inc()
        log.warning(
            "the API answered 200 but accepted_events=%d for %d events sent",
            accepted.accepted_events,
            len(group),
            extra={
                "destination": self.queue.keys.destination,
                "count": len(group),
                "accepted_events": accepted.accepted_events,
                "first_id": group[0].event_id,
                "last_id": group[-1].event_id,
                "request_id": next(iter(accepted.request_ids.values()), None),
            },
        )

    def retry_plan(self, group: Sequence[Entry], err: SendError) -> tuple[float, int]:
        """The wait before the next attempt of ``group`` and the attempt number."""
        attempt = max(e.attempts for e in group) + 1
        delay = backoff_s(
            attempt,
            base_s=self.settings.retry_base_s,
            cap_s=self.settings.retry_cap_s,
            retry_after_s=err.response.retry_after_s,
            rand=self.rand,
        )
        return delay, attempt

    async def retry(self, group: Sequence[Entry], err: SendError) -> None:
        """Schedule another attempt; dead-letter only events whose next attempt would fall
        past their 7-day window (or past CAPI_MAX_ATTEMPTS, when set)."""
        delay, attempt = self.retry_plan(group, err)
        now = self.now_ms()
        due = now + int(delay * 1000)

        def fits(e: Entry) -> bool:
            deadline = e.timestamp_ms + API_MAX_AGE_MS - STALE_MARGIN_MS
            return within_budget(
                e.attempts + 1,
                self.settings.max_attempts,
                next_attempt_ms=due,
                deadline_ms=deadline,
            )

        again = [e for e in group if fits(e)]
        exhausted = [e for e in group if not fits(e)]
        if exhausted:
            await self.dead_letter(exhausted, Reason.RETRIES_EXHAUSTED, err, attempted=True)
        if not again:
            return
        error = {
            "reason": err.reason.value,
            "status": err.status,
            "message": err.response.message[:500],
            "request_ids": err.response.request_ids,
        }
        down = err.reason in (Reason.SERVER_ERROR, Reason.NETWORK)  # 429 is "slow down"
        await self.queue.schedule_retry(
            again,
            due,
            error,
            now,
            endpoint_error=str(err)[:300] if down else "",
            server_asked=err.response.retry_after_s is not None,
        )
        self.metrics.retried.labels(err.reason.value).inc(len(again))
        log.warning(
            "retrying %d events in %.2f s after %s (attempt %d)",
            len(again),
            delay,
            err.reason.value,
            attempt,
            extra={
                "destination": self.queue.keys.destination,
                "count": len(again),
                "event_ids": [e.event_id for e in again],
                "reason": err.reason.value,
                "status": err.status,
                "request_id": err.request_id,
                "delay_s": round(delay, 3),
                "attempt": attempt,
            },
        )

    async def dead_letter(
        self, group: Sequence[Entry], reason: Reason, err: SendError | None, *, attempted: bool
    ) -> None:
        """Record dead letters with their guidance, atomically with the acknowledgement."""
        guidance = diagnose(
            err or reason,
            reason=reason,
            pixel_id=self.client.pixel_id,
            api_key=self._api_key,
            labels=self.client.labels,
        ).text
        now = self.now_ms()
        records = [
            deadletters.build(
                e,
                reason=reason,
                guidance=guidance,
                error=err,
                key_fingerprint=self.client.key_fingerprint,
                pixel_id=self.client.pixel_id,
                now_ms=now,
                attempted=attempted,
                destination=self.queue.keys.destination,
            )
            for e in group
        ]
        await deadletters.write(
            self.redis,
            self.queue.keys,
            self.queue.group,
            group,
            records,
            dedup_window_s=self.settings.dedup_window_s,
        )
        self.metrics.dead_lettered.labels(reason.value).inc(len(group))
        log.warning(
            "dead-lettered %d events (%s)",
            len(group),
            reason.value,
            extra={
                "destination": self.queue.keys.destination,
                "count": len(group),
                "event_ids": [e.event_id for e in group],
                "reason": reason.value,
                "status": err.status if err else None,
                "request_id": err.request_id if err else None,
            },
        )
