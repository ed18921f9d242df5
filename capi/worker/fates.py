"""Recording an event's fate: the Redis write (atomic with the acknowledgement), the metric,
and one log line with event ids and request ids. :mod:`capi.worker.decisions` decides,
:mod:`capi.worker.sender` carries the decision out; this records it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence

import redis.asyncio as aioredis
import redis.exceptions

from capi import deadletters
from capi._aio import aw
from capi.client import Accepted, ConversionsClient
from capi.clock import Clock, now_ms
from capi.errors import SendError
from capi.failures import Reason
from capi.guidance import diagnose
from capi.metrics import DestinationMetrics
from capi.queue import Entry, Queue
from capi.settings import Settings
from capi.worker.decisions import RetryPlan, fate

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
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.queue = queue
        self.client = client
        self.metrics = metrics
        self._api_key = api_key
        self.clock = clock

    def now_ms(self) -> int:
        """The clock's time in Unix milliseconds."""
        return now_ms(self.clock)

    async def delivered(
        self, group: Sequence[Entry], accepted: Accepted, *, count_mismatch: bool = False
    ) -> int | None:
        """Acknowledge a delivered batch (and, with ``count_mismatch``, count the 200 whose
        accepted_events disagreed); if this ends an endpoint outage, since when (ms)."""
        recovered = await self.queue.deliver(group, self.now_ms())
        if count_mismatch:
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

    async def retry(self, plan: RetryPlan[Entry], err: SendError) -> None:
        """Record a retry as planned (:func:`~capi.worker.decisions.plan_retry`): the events
        that may go again are scheduled, the exhausted ones dead-lettered."""
        if plan.exhausted:
            await self.dead_letter(plan.exhausted, Reason.RETRIES_EXHAUSTED, err, attempted=True)
        again = plan.again
        if not again:
            return
        error = {
            "reason": err.reason.value,
            "status": err.status,
            "message": err.response.message[:500],
            "request_ids": err.response.request_ids,
        }
        await self.queue.schedule_retry(
            again,
            plan.due_ms,
            error,
            self.now_ms(),
            endpoint_error=str(err)[:300] if fate(err.reason).endpoint_down else "",
            server_asked=err.response.retry_after_s is not None,
        )
        self.metrics.retried.labels(err.reason.value).inc(len(again))
        log.warning(
            "retrying %d events in %.2f s after %s (attempt %d)",
            len(again),
            plan.delay_s,
            err.reason.value,
            plan.attempt,
            extra={
                "destination": self.queue.keys.destination,
                "count": len(again),
                "event_ids": [e.event_id for e in again],
                "reason": err.reason.value,
                "status": err.status,
                "request_id": err.request_id,
                "delay_s": round(plan.delay_s, 3),
                "attempt": plan.attempt,
            },
        )

    async def request_failed(self) -> None:
        """Count a request the API answered with a failure (a delivery's is counted with
        its acknowledgement), so ``capi status`` counts every request sent."""
        with contextlib.suppress(redis.exceptions.RedisError):  # a count must not block a fate
            await aw(self.redis.hincrby(self.queue.keys.stats, "requests", 1))

    async def dead_letter(
        self,
        group: Sequence[Entry],
        reason: Reason,
        err: SendError | None,
        *,
        attempted: bool,
        errors: Sequence[SendError] | None = None,
    ) -> None:
        """Record dead letters with their guidance, atomically with the acknowledgement;
        ``errors`` gives each entry an error of its own (else ``err`` is every entry's)."""
        each: Sequence[SendError | None] = errors if errors is not None else [err] * len(group)
        guidance: dict[int, str] = {}
        for e in each:
            if id(e) not in guidance:
                guidance[id(e)] = diagnose(
                    e or reason,
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
                guidance=guidance[id(error)],
                error=error,
                key_fingerprint=self.client.key_fingerprint,
                pixel_id=self.client.pixel_id,
                now_ms=now,
                attempted=attempted,
                destination=self.queue.keys.destination,
            )
            for e, error in zip(group, each, strict=True)
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
