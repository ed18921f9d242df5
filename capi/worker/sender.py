"""The sender: reads queued events in batches, POSTs them, and gives each event its fate.

One :class:`Sender` per destination runs in each worker process; the worker's lanes
(:mod:`capi.worker.lanes`) take turns on the senders. A turn reads up to ``batch_size`` entries
from the destination's stream through the consumer group (waiting at most
``batch_wait_ms`` to fill a batch when no other destination is waiting), drops events
already outside the API's time window into dead letters, and sends the rest. Then, per
event:

The fate of each outcome is looked up in :mod:`capi.worker.decisions`; in short:

- accepted: acknowledged;
- rejected at ``events[i]``: that event is dead-lettered, the rest resent at once; with no
  index the batch is bisected until the bad events are isolated;
- key problem: the :class:`~capi.worker.keyguard.KeyGuard` re-probes; transient -> retry,
  confirmed -> dead-letter this batch and hold every worker; already held -> hand back;
- retryable (429, 5xx, network): scheduled for retry with capped jittered backoff for as
  long as the event's 7-day window allows (see :func:`capi.worker.decisions.plan_retry`);
  meanwhile the endpoint
  is marked failing (5xx, network; a 429 is "slow down", not "down"), and the first
  delivery after an outage of ``OUTAGE_RELEASE_S`` or more releases every scheduled retry
  at once (except waits the server asked for), so the backlog drains at full speed;
- anything else: dead-lettered with the raw response.

Nothing stops the sender but :meth:`Sender.stop`. A Redis error of any kind (away, full,
read-only, group lost) is logged once by :class:`~capi.trouble.Trouble` and the same step
is tried again with backoff; a fate already decided (say, delivered) is recorded as soon
as Redis answers again, never decided anew, so nothing is sent twice because Redis was
away. Housekeeping (:mod:`capi.worker.housekeeping`) runs beside the lanes.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import redis.asyncio as aioredis
import redis.exceptions

from capi import destinations, keycheck
from capi.batches import by_size, drop_rejected
from capi.client import ConversionsClient, build_body
from capi.clock import Clock, ms, now_ms
from capi.constants import API_MAX_BODY_BYTES
from capi.destinations import Destination
from capi.errors import InvalidEventError, SendError
from capi.failures import Reason
from capi.keycheck import KeyCheck
from capi.metrics import Metrics
from capi.queue import Entry, Queue
from capi.settings import Settings
from capi.trouble import Trouble
from capi.worker import decisions
from capi.worker.decisions import Action, Fate, Outcome, Verdict
from capi.worker.endpoint import OUTAGE_RELEASE_S, Endpoint
from capi.worker.fates import Fates
from capi.worker.keyguard import KeyGuard

__all__ = ["OUTAGE_RELEASE_S", "Sender", "redis_pool"]

log = logging.getLogger("capi.sender")

_MUST = object()  # durably(): the step must happen, stopping or not


class Sender:
    """One destination's sender: takes the turns the lanes give it (read a batch, send it,
    carry out each outcome's fate) until stopped; burst mode is the lanes' (see
    :func:`capi.worker.lanes.run_sender`)."""

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
        destination: Destination | None = None,
    ) -> None:
        self.settings = settings
        self._destination = destination or destinations.default(settings)
        self.metrics = (metrics or Metrics()).for_destination(self._destination.name)
        self.redis = redis
        self.client = client
        self.keys = settings.keys.for_destination(self._destination.name)
        self.queue = Queue(redis, self.keys)
        self._name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.clock = clock
        api_key = self._destination.api_key
        self._guard = KeyGuard(
            client,
            redis,
            self.keys,
            api_key=api_key,
            confirmations=settings.probe_confirmations,
            reprobe_interval_s=settings.reprobe_interval_s,
            min_probe_interval_s=min(5.0, settings.reprobe_interval_s),
            probe_pause_s=min(0.5, settings.reprobe_interval_s),
        )
        self._trouble = Trouble(log, rand=rand)
        self._stopping = asyncio.Event()
        # Whether the Redis pool is this sender's own (closed by aclose) or its worker's.
        self._owns_redis = True
        # Entries read and not yet given a fate, and the consumer that holds each.
        self._inflight: dict[bytes, Entry] = {}
        self._owner: dict[bytes, str] = {}
        # Of those, the ones the API accepted whose acknowledgement waits for Redis.
        self._delivered: set[bytes] = set()
        # Batches taken over from stopped workers, waiting for a lane.
        self._reclaimed: collections.deque[list[Entry]] = collections.deque()
        self._endpoint = Endpoint(self.metrics, clock)
        self.fates = Fates(
            settings,
            redis,
            self.queue,
            client,
            self.metrics,
            api_key=api_key,
            clock=clock,
        )
        self._rand = rand

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        destination: Destination | None = None,
        *,
        redis: aioredis.Redis | None = None,
        http: httpx.AsyncClient | None = None,
        **kwargs: Any,
    ) -> Sender:
        """A sender for one destination (``default`` unless named), with its own HTTP client
        and Redis pools unless a worker's shared ones are given (``http``, ``redis``); its
        own are closed by :meth:`aclose`."""
        dest = destination or destinations.default(settings)
        client = ConversionsClient.for_destination(
            dest, timeout_s=settings.request_timeout_s, http=http
        )
        sender = cls(settings, redis or redis_pool(settings), client, destination=dest, **kwargs)
        sender._owns_redis = redis is None
        return sender

    async def aclose(self) -> None:
        """Close the HTTP client, and the Redis pool if it is this sender's own."""
        await self.client.aclose()
        if self._owns_redis:
            await self.redis.aclose()

    # -- what others ask -------------------------------------------------------------
    @property
    def destination(self) -> Destination:
        """The destination this sender serves."""
        return self._destination

    @property
    def name(self) -> str:
        """The worker name its consumers are named after (``NAME:lane``)."""
        return self._name

    @property
    def trouble(self) -> Trouble:
        """The Redis trouble this sender reports to (its worker's, once on the lanes)."""
        return self._trouble

    def join(self, name: str, trouble: Trouble) -> None:
        """Serve on a worker's lanes: consumers named after the worker, Redis trouble said
        once per worker."""
        self._name = name
        self._trouble = trouble

    @property
    def held(self) -> bool:
        """Whether this destination's key is held (broken; its events stay queued)."""
        return self._guard.held

    @property
    def holding(self) -> bool:
        """Whether this sender holds entries: in flight, or reclaimed and waiting."""
        return bool(self._inflight or self._reclaimed)

    def has_reclaimed(self) -> bool:
        """Whether batches taken over from stopped workers wait for a lane."""
        return bool(self._reclaimed)

    def reclaim_room(self) -> bool:
        """Whether more reclaimed batches may wait (at most four per concurrency slot)."""
        return len(self._reclaimed) < self.settings.concurrency * 4

    def take_over(self, batch: list[Entry]) -> None:
        """Queue a batch reclaimed from a stopped worker for the next lane."""
        self._reclaimed.append(batch)

    async def check_key(self) -> KeyCheck:
        """The startup key check (see :meth:`KeyGuard.check`)."""
        result = await self._guard.check()
        if result.ok:
            self.metrics.key_ok.set(1)
        return result

    async def hold(self, check: KeyCheck) -> None:
        """Hold this destination after a failed startup key check."""
        await self._guard.hold(check)
        self.metrics.key_ok.set(0)

    async def adopt_key_state(self, state: bytes | None) -> None:
        """Adopt the key state another worker may have written (see :meth:`KeyGuard.adopt`)."""
        await self._guard.adopt(state)
        self.metrics.key_ok.set(0 if self._guard.held else 1)

    async def try_release(self) -> bool:
        """While held: re-probe (one worker at a time); True once the key works again."""
        released = await self._guard.try_release() and not self._guard.held
        if released:
            self.metrics.key_ok.set(1)
        return released

    async def refresh_gauges(self, now_ms: int) -> None:
        """Read queue depth, in flight, retries and the oldest age into the gauges."""
        depth, in_flight, oldest_ms, retries = await self.queue.depth()
        age_s = (now_ms - oldest_ms) / 1000 if oldest_ms else 0.0
        self.metrics.set_depth(depth, in_flight, retries, age_s)

    # -- lifecycle -------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the sender to stop reading; in-flight batches finish."""
        self._stopping.set()

    async def stopped(self) -> None:
        """Wait until a stop is asked for."""
        await self._stopping.wait()

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._stopping.is_set()

    @property
    def in_flight(self) -> int:
        """Events read and not yet given a fate (or waiting for Redis to record it)."""
        return len(self._inflight)

    def state(self) -> tuple[str, str]:
        """What this sender is doing, for ``capi status``: a state and a detail line."""
        if not self._trouble.redis_ok:
            return "waiting for Redis", self._trouble.describe()
        if self._guard.held:
            return "held", "its destination's key is held; sending resumes once a re-probe passes"
        if self._endpoint.failing:
            return "waiting for the endpoint", self._endpoint.describe()
        if self._inflight or self._reclaimed:
            return "sending", f"{len(self._inflight)} events in flight"
        return "idle", "nothing queued"

    async def start(self) -> None:
        """Get ready to send: the consumer group exists, the key state and the retry index
        are read from Redis. Waits out Redis trouble (returns early if stopped)."""
        await self.durably("start", self._start, unless_stopping=None)

    async def _start(self) -> None:
        await self.queue.ensure_group()
        await self.queue.index_retries()
        await self._guard.sync()
        self.metrics.key_ok.set(0 if self._guard.held else 1)

    async def leave(self) -> None:
        """Record deliveries still waiting for Redis and hand back the rest of what is in
        flight (briefly: Redis may be away). Called once no lane works for this sender."""
        for batch in self._reclaimed:
            for e in batch:
                self._inflight.setdefault(e.stream_id, e)
        self._reclaimed.clear()
        delivered = [e for sid, e in self._inflight.items() if sid in self._delivered]
        unsent = [e for sid, e in self._inflight.items() if sid not in self._delivered]
        try:
            async with asyncio.timeout(max(1.0, self.settings.redis_timeout_s)):
                if delivered:  # the API has them: acknowledge, never hand back
                    await self.queue.deliver(delivered, self._now())
                    log.warning("recorded %d deliveries on the way out", len(delivered))
                    delivered = []
                if unsent:
                    await self.queue.hand_back(unsent)
                    log.warning("handed %d in-flight events back to the queue", len(unsent))
                    unsent = []
        except (TimeoutError, redis.exceptions.RedisError) as exc:
            why = str(exc) or type(exc).__name__
            where = self._destination.name
            if delivered:
                log.error(
                    "destination %s: could not reach Redis while stopping (%s): %d events the "
                    "API accepted could not be acknowledged; another worker takes them over "
                    "and sends them again once this one's heartbeat is stale (the API dedups "
                    "on their ids)",
                    where,
                    why,
                    len(delivered),
                )
            if unsent:
                log.error(
                    "destination %s: could not reach Redis while stopping (%s): %d in-flight "
                    "events stay pending and are taken over by another worker once this "
                    "one's heartbeat is stale",
                    where,
                    why,
                    len(unsent),
                )
        self._inflight.clear()
        self._delivered.clear()

    async def durably(
        self, what: str, step: Callable[[], Awaitable[Any]], *, unless_stopping: Any = _MUST
    ) -> Any:
        """Run a Redis step until it succeeds, waiting out any Redis trouble meanwhile.

        Used for every fate already decided: an event delivered is acknowledged as soon as
        Redis answers again, never sent again because Redis was away. A step that need not
        happen once the sender is stopping (a read, the start) gives ``unless_stopping``:
        returned instead, once a stop is asked for.
        """
        while True:
            if unless_stopping is not _MUST and self.stopping:
                return unless_stopping
            sent = self._trouble.now()
            try:
                result = await step()
            except redis.exceptions.RedisError as exc:
                delay = self._trouble.failed(exc, what)
                self.metrics.redis_up.set(0)
                if "NOGROUP" in str(exc):
                    await self.recreate_group()
                await asyncio.sleep(delay)
                continue
            self._trouble.ok(sent=sent)
            self.metrics.redis_up.set(1)
            return result

    async def recreate_group(self) -> None:
        """Recreate the consumer group if Redis lost it (NOGROUP)."""
        try:
            if await self.queue.ensure_group():
                log.error(
                    "the stream's consumer group was missing (Redis restarted without "
                    "persistence, or was flushed) and has been recreated"
                )
        except redis.exceptions.RedisError as exc:
            log.debug("could not recreate the consumer group yet: %s", exc)

    # -- a lane's turn ---------------------------------------------------------------
    async def take_turn(self, consumer: str, *, fill: bool) -> bool:
        """One batch for a lane: a reclaimed one, or up to ``batch_size`` new entries read
        as ``consumer`` (with ``fill``, waiting up to ``batch_wait_ms`` to fill it). Gives
        each its fate; False when there was nothing to send. Never raises but on cancel."""
        batch: list[Entry] = []
        try:
            if self._reclaimed:
                batch = self._reclaimed.popleft()
                owner = f"{self._name}:reclaim"
            else:
                batch = await self.durably(
                    "reading the queue",
                    functools.partial(self._read, consumer, fill),
                    unless_stopping=[],
                )
                owner = consumer
            if batch:
                await self.process(batch, owner=owner)
            return bool(batch)
        except Exception as exc:  # a bug, not Redis: say so, keep the events, go on
            delay = self._trouble.failed(exc, f"sending for {self._destination.name}")
            left = [e for e in batch if e.stream_id in self._inflight]
            if left:
                await self.durably(
                    "handing back a batch", functools.partial(self.queue.hand_back, left)
                )
                self._done(left)
            await asyncio.sleep(delay)
            return True

    async def _read(self, consumer: str, fill: bool) -> list[Entry]:
        size = self.settings.batch_size
        entries = self._hold(await self.queue.read(consumer, size), consumer)
        wait_s = self.settings.batch_wait_ms / 1000 if fill else 0.0
        deadline = time.monotonic() + wait_s
        while entries and len(entries) < size and not self.stopping:
            remaining_ms = ms(deadline - time.monotonic())
            if remaining_ms <= 0:
                break
            try:
                more = await self.queue.read_more(consumer, size - len(entries), remaining_ms)
            except redis.exceptions.RedisError as exc:
                # Send what was read; entries this read may have taken are pending in
                # ``consumer`` and taken back by housekeeping (Queue.reclaim_lost).
                self._trouble.failed(exc, "filling a batch")
                break
            if not more:
                break
            entries += self._hold(more, consumer)
        return entries

    def _hold(self, entries: list[Entry], owner: str) -> list[Entry]:
        """Count entries as held from the moment a read returns them: whatever this worker
        does not hold of its own consumers' pending entries had its answer lost."""
        for e in entries:
            self._inflight[e.stream_id] = e
            self._owner[e.stream_id] = owner
        return entries

    async def process(self, entries: Sequence[Entry], *, owner: str = "") -> None:
        """Give every entry of a batch its fate."""
        self._hold(list(entries), owner)
        limit = decisions.stale_before_ms(self._now())
        stale = [e for e in entries if e.timestamp_ms < limit]
        if stale:
            gone = decisions.fate(Outcome.STALE)
            assert gone.reason is not None
            await self._dead_letter(stale, gone.reason, None, attempted=gone.attempted)
        fresh = [e for e in entries if e.timestamp_ms >= limit]
        for chunk in _by_size(fresh, API_MAX_BODY_BYTES - 1024):
            await self._send(chunk)

    def held_ids(self) -> set[bytes]:
        """The stream ids this worker holds: in flight, or reclaimed and waiting for a lane."""
        held = set(self._inflight)
        for batch in self._reclaimed:
            held.update(e.stream_id for e in batch)
        return held

    def leases(self) -> dict[str, list[bytes]]:
        """The stream ids in flight, by the consumer that holds them."""
        by_owner: dict[str, list[bytes]] = {}
        for sid in self._inflight:
            by_owner.setdefault(self._owner.get(sid) or f"{self._name}:0", []).append(sid)
        return by_owner

    async def _send(self, entries: list[Entry]) -> None:
        work = [entries]
        while work:
            group = work.pop()
            body = build_body(
                [e.event for e in group],
                validate_only=self.client.validate_only,
                integration_source=self.client.integration_source,
            )
            started = time.perf_counter()
            try:
                accepted = await self.client.send_body(body)
            except SendError as err:
                self.metrics.send_latency.observe(time.perf_counter() - started)
                await self.fates.request_failed()
                work.extend(await self._failed(group, err, decisions.fate(err.reason)))
                continue
            self._delivered.update(e.stream_id for e in group)
            done = decisions.fate(decisions.delivered(accepted.accepted_events, len(group)))
            failing_since_ms: int | None = await self.durably(
                "recording a delivery",
                functools.partial(
                    self.fates.delivered, group, accepted, count_mismatch=done.count_mismatch
                ),
            )
            self._done(group)
            if failing_since_ms is not None or self._endpoint.failing:
                await self._endpoint_recovered(failing_since_ms)

    async def _failed(self, group: list[Entry], err: SendError, fate: Fate) -> list[list[Entry]]:
        """Carry out ``fate`` for a failed send; the groups to send again at once."""
        if fate.action is Action.REPROBE:
            fate = decisions.AFTER_PROBE[await self._reprobe(err)]
        elif fate.action is Action.HOLD:
            fate = decisions.AFTER_HOLD[await self._reprobe(err)]
        if fate.action is Action.DROP_REJECTED:
            bad, again = drop_rejected(group, err.response.event_indexes)
            named = set(err.response.event_indexes)
            # Each event named gets its own errors, and the reason they give (one answer
            # may name an invalid event and one too old).
            by_reason: dict[Reason, list[tuple[Entry, SendError]]] = {}
            for i in bad:
                own = err.for_event(i) if isinstance(err, InvalidEventError) and i in named else err
                by_reason.setdefault(own.reason, []).append((group[i], own))
            for reason, letters in by_reason.items():
                entries, errors = [e for e, _ in letters], [o for _, o in letters]
                await self._dead_letter(entries, reason, err, errors=errors)
            return again
        if fate.action is Action.RETRY:
            if fate.endpoint_down:
                self._endpoint.failed(err)
            await self._retry(group, err)
        elif fate.action is Action.HAND_BACK:
            await self.durably("handing back a batch", lambda: self.queue.hand_back(group))
            self._done(group)
            await self.fates.held(group, err.reason.value)
        else:
            await self._dead_letter(group, fate.reason or err.reason, err, attempted=fate.attempted)
        return []

    async def _reprobe(self, err: SendError) -> Verdict:
        """The key guard's verdict on a key failure (transient while Redis is in trouble)."""
        try:
            verdict = await self._guard.confirm(err)
        except redis.exceptions.RedisError as exc:
            # The hold cannot be recorded while Redis is in trouble: retry the batch;
            # the failure is confirmed again once Redis answers.
            self._trouble.failed(exc, "confirming a key failure")
            verdict = Verdict.TRANSIENT
        self.metrics.key_ok.set(0 if self._guard.held else 1)
        if verdict is Verdict.TRANSIENT:
            self.metrics.transient_key_failures.labels(err.reason.value).inc()
        return verdict

    async def probe_endpoint(self) -> bool:
        """While the endpoint is marked failing (by this worker's sends, or in Redis: the
        worker that found it failing may have stopped since) and this destination has
        nothing left to send (no send of its own would say the endpoint is back: nothing
        queued, in flight or scheduled for retry), ask the endpoint with one validate_only
        request; any answer but a failure of the endpoint itself (5xx, network) ends the
        failing state, as a delivery does. True if it did."""
        if self._guard.held or self.holding:
            return False
        if not self._endpoint.failing and not await self.queue.endpoint_marked_failing():
            return False
        queued, in_flight, _, retries = await self.queue.depth()
        if queued or in_flight or retries:
            return False
        error = await keycheck.probe(self.client)
        if error is not None and decisions.fate(error.reason).endpoint_down:
            self._endpoint.failed(error)
            return False
        now = self._now()
        since = await self.durably(
            "recording that the endpoint answers",
            functools.partial(self.queue.endpoint_answered, now),
        )
        await self._endpoint_recovered(since)
        return True

    async def _endpoint_recovered(self, failing_since_ms: int | None) -> None:
        lasted = self._endpoint.delivered(failing_since_ms)
        if lasted is None:
            return  # a hiccup: scheduled retries keep their backoff
        # After an outage the backlog goes now, not at the pace of the longest backoff
        # (except retries whose wait the server asked for with Retry-After).
        moved = await self.durably("releasing retries", self.queue.release_retries)
        log.warning(
            "the endpoint answers again after %.0f s of failures; %d scheduled retries "
            "released at once",
            lasted,
            moved,
        )

    async def _retry(self, group: list[Entry], err: SendError) -> None:
        async def record() -> None:
            plan = decisions.plan_retry(
                group,
                now_ms=self._now(),
                retry_after_s=err.response.retry_after_s,
                base_s=self.settings.retry_base_s,
                cap_s=self.settings.retry_cap_s,
                max_attempts=self.settings.max_attempts,
                rand=self._rand,
            )
            if err.response.retry_after_s and plan.delay_s > self.settings.retry_cap_s:
                log.warning(
                    "the endpoint asked for Retry-After: %.0f s (longer than "
                    "CAPI_RETRY_CAP_S=%g): %d events wait that long; %d past their 7-day "
                    "window are dead-lettered",
                    plan.delay_s,
                    self.settings.retry_cap_s,
                    len(plan.again),
                    len(plan.exhausted),
                    extra={"destination": self.destination.name},
                )
            await self.fates.retry(plan, err)

        await self.durably("scheduling a retry", record)
        self._done(group)

    async def _dead_letter(
        self,
        group: Sequence[Entry],
        reason: Reason,
        err: SendError | None,
        *,
        attempted: bool = True,
        errors: Sequence[SendError] | None = None,
    ) -> None:
        await self.durably(
            "recording dead letters",
            lambda: self.fates.dead_letter(group, reason, err, attempted=attempted, errors=errors),
        )
        self._done(group)

    def _done(self, group: Sequence[Entry]) -> None:
        for e in group:
            self._inflight.pop(e.stream_id, None)
            self._owner.pop(e.stream_id, None)
            self._delivered.discard(e.stream_id)

    def _now(self) -> int:
        return now_ms(self.clock)


def redis_pool(settings: Settings) -> aioredis.Redis:
    """The Redis pool of a worker's senders: each call bounded by ``CAPI_REDIS_TIMEOUT_S``
    on top of the longest a read waits to fill a batch (``CAPI_BATCH_WAIT_MS``)."""
    return settings.async_redis(
        socket_timeout=settings.redis_timeout_s + settings.batch_wait_ms / 1000
    )


def _by_size(entries: list[Entry], limit: int) -> list[list[Entry]]:
    return by_size(entries, lambda e: len(e.event), max_bytes=limit)
