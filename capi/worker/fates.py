"""Recording an event's fate: the Redis write (atomic with the acknowledgement), the metric,
one log line with event ids and request ids, and a line in the live-outcomes ring that
``capi tail`` reads (:mod:`capi.tail`). :mod:`capi.worker.decisions` decides,
:mod:`capi.worker.sender` carries the decision out; this records it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence

import redis.asyncio as aioredis
import redis.exceptions

from capi import coverage, deadletters, tail
from capi._aio import aw
from capi.client import Accepted, ConversionsClient
from capi.clock import Clock, now_ms
from capi.errors import SendError
from capi.failures import Reason
from capi.guidance import diagnose
from capi.kinds import KINDS
from capi.metrics import DestinationMetrics
from capi.queue import Entry, Queue, identifier_counts
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
        accepted_events disagreed); if this ends an endpoint outage, since when (ms).
        A test-mode (validate_only) destination's batches are counted as validated."""
        validated = self.client.validate_only
        counts = None if validated else identifier_counts(group)
        recovered = await self.queue.deliver(
            group, self.now_ms(), validated=validated, counts=counts
        )
        if count_mismatch:
            await self._accepted_mismatch(group, accepted)
        (self.metrics.validated if validated else self.metrics.delivered).inc(len(group))
        for kind, n in (counts or {}).items():
            if n and (kind in KINDS or kind == "any_strong"):
                self.metrics.with_identifier.labels(kind).inc(n)
        self.metrics.batch_size.observe(len(group))
        self.metrics.send_latency.observe(accepted.elapsed_s)
        request_id = next(iter(accepted.request_ids.values()), None)
        status = "validated" if validated else "delivered"
        await self._tail(
            tail.Outcome(
                status,
                _described(group),
                request_id=request_id,
                latency_ms=accepted.elapsed_s * 1000,
            )
        )
        log.info(
            "%s %d events",
            status,
            len(group),
            extra={
                "destination": self.queue.keys.destination,
                "count": len(group),
                "first_id": group[0].event_id,
                "last_id": group[-1].event_id,
                "request_id": request_id,
                "latency_ms": round(accepted.elapsed_s * 1000, 1),
            },
        )
        return recovered

    async def held(self, group: Sequence[Entry], reason: str) -> None:
        """Record (in the ring only) that these events went back to the queue unsent
        because the destination is held; they stay queued."""
        await self._tail(tail.Outcome("held", _described(group), reason=reason))

    async def _tail(self, outcome: tail.Outcome) -> None:
        """Add ``outcome`` to the live-outcomes ring. The ring is a view: the fate itself is
        already recorded, so a failed write is logged and otherwise ignored."""
        entries = self.settings.tail_entries
        found = tail.writes(self.queue.keys.tail, outcome, entries)
        try:
            await tail.append(self.redis, found, entries)
        except redis.exceptions.RedisError as exc:
            log.debug("the live-outcomes ring missed a %s line: %s", outcome.status, exc)

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
        await self._tail(
            tail.Outcome(
                "retrying",
                _described(again),
                request_id=err.request_id,
                reason=err.reason.value,
                next_attempt_ms=plan.due_ms,
            )
        )
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
        await self._tail(
            tail.Outcome(
                "dead_lettered",
                _described(group),
                request_id=err.request_id if err else None,
                reason=reason.value,
            )
        )
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


def _described(group: Sequence[Entry]) -> list[tuple[str, str, list[str], int]]:
    """(id, name, identifier kinds, timestamp) of each event, for the ring: names only.
    Read without parsing the event: the kinds from the entry's mask (:mod:`capi.coverage`),
    the name from the JSON's bytes (:func:`capi.tail.name_of_json`)."""
    return [
        (
            e.event_id,
            tail.name_of_json(e.event),
            list(
                coverage.kinds(e.kinds if e.kinds is not None else coverage.mask_of_json(e.event))
            ),
            e.timestamp_ms,
        )
        for e in group
    ]
