"""Lanes: the batches one worker process sends, shared fairly by every destination it serves.

A worker runs ``LANES_PER_SLOT x concurrency`` lanes, whatever the number of destinations.
A lane takes a turn on one destination's :class:`~capi.worker.sender.Sender`: one batch read,
sent and given its fate. Which destination gets the next turn:

- only an *active* one: a destination whose stream may hold unread entries, or that has
  batches reclaimed from a stopped worker. Redis keeps the set of active destinations
  (``{p}:active``, see :mod:`capi.constants`): every script that writes to a stream adds
  its destination, and the read that finds the stream empty removes it, atomically (on a
  Redis Cluster, in the order :mod:`capi.index` describes, swept every few seconds). So an
  idle destination costs next to nothing: its stream is not polled (housekeeping reads
  each once a minute, as a check), however many are configured.
  Idle lanes wait for a wake-up on one shared stream (``{p}:wake``), which every worker
  watches with one blocking read; the active set is read again every ``REFRESH_S``;
- never a held one (its key is broken), nor one that already has ``concurrency`` batches
  in flight: a slow or failing endpoint holds at most a quarter of the lanes, and the
  others go on at the rate they would have without it. Slow destinations (turns taking
  over ``SLOW_TURN_S`` on average) together hold at most half the lanes, however many
  there are;
- of the rest, the one with the fewest batches in flight, in turn (round robin): a
  destination with a backlog of millions does not starve one with a trickle.

A read waits up to ``batch_wait_ms`` to fill a batch only when no other destination waits
for a lane. Housekeeping (:mod:`capi.worker.housekeeping`) runs once per worker, beside the lanes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator

import redis.asyncio as aioredis
import redis.exceptions

from capi.clock import LIVENESS_S, Clock
from capi.metrics import WAITS_SAID, Metrics
from capi.queue import Queue
from capi.settings import Settings
from capi.trouble import Trouble
from capi.worker.housekeeping import Housekeeping
from capi.worker.sender import Sender

log = logging.getLogger("capi.lanes")

# The active set is read again this often, whatever the wake-ups said (one may be lost
# with a Redis restart).
REFRESH_S = 1.0
# An idle lane looks again at least this often.
IDLE_WAIT_S = 0.5
# Lanes per CAPI_CONCURRENCY slot: a destination may use one slot's worth; the other three
# go on for the rest when one destination's endpoint is slow.
LANES_PER_SLOT = 4
# A destination whose turns take this long (a moving average) is slow: all slow ones
# together get at most half the lanes.
SLOW_TURN_S = 1.0
# The longest a watcher's blocking read on the wake stream waits.
WAKE_BLOCK_MS = 1000


class Lanes:
    """The lanes of one worker process and the senders (one per destination) they serve."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        *,
        name: str | None = None,
        metrics: Metrics | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.keys = settings.keys
        # For what the worker does as a whole: heartbeats, live workers, signing off.
        self.queue = Queue(redis, self.keys)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        # The destinations served, each with its seat (its sender and its turns).
        self._seats: dict[str, _Seat] = {}
        # Seats of senders replaced by a newer one of the same destination, not yet removed.
        self._replaced: dict[Sender, _Seat] = {}
        self.trouble = Trouble(log)
        # Destinations that may have work, each with a count of its activations: a lane
        # that found a stream empty drops it only if it was not activated meanwhile.
        self.active: dict[str, int] = {}
        # Destinations whose start (key check) is still under way (burst mode waits).
        self._starting = 0
        # How many senders were taken off (remove): a burst worker takes one off only as
        # it stops (SIGTERM, or Redis not answering), so it is not drained (housekeeping).
        self.removed = 0
        self.per_destination = settings.concurrency
        self.lane_count = LANES_PER_SLOT * settings.concurrency
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._turn = 0

    # -- membership ------------------------------------------------------------------
    @property
    def senders(self) -> dict[str, Sender]:
        """The senders served, by destination name (a copy)."""
        return {name: seat.sender for name, seat in self._seats.items()}

    @property
    def starting(self) -> int:
        """How many destinations are still being started (their key checked)."""
        return self._starting

    def expect(self, count: int) -> None:
        """``count`` more destinations are being started (burst mode waits for them)."""
        self._starting += count

    def started(self) -> None:
        """One of the destinations expected has started (or given up)."""
        self._starting -= 1

    def add(self, sender: Sender) -> None:
        """Serve a destination's sender (started: see :meth:`Sender.start`)."""
        sender.join(self.name, self.trouble)
        old = self._seats.get(sender.destination.name)
        if old is not None:
            self._replaced[old.sender] = old
        self._seats[sender.destination.name] = _Seat(sender)
        self.activate(sender.destination.name)

    async def remove(self, sender: Sender) -> None:
        """Stop serving a sender: its in-flight batches finish (up to the shutdown
        timeout; those still unfinished are cancelled, so no lane records a fate after
        this), then what it still holds is recorded or handed back."""
        sender.stop()
        self.removed += 1
        self._changed.set()
        name = sender.destination.name
        seat = self._seats.get(name)
        if seat is None or seat.sender is not sender:
            seat = self._replaced.pop(sender, None) or _Seat(sender)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.shutdown_timeout_s):
                while seat.batches:
                    self._changed.clear()
                    await self._changed.wait()
        turns = set(seat.turns)
        for turn in turns:
            turn.cancel()
        await asyncio.gather(*turns, return_exceptions=True)
        await sender.leave()
        if self._seats.get(name) is seat:
            del self._seats[name]
            self.active.pop(name, None)

    def activate(self, name: str) -> None:
        """Mark a destination as having work (if this worker serves it)."""
        if name in self._seats:
            self.active[name] = self.active.get(name, 0) + 1
            self._changed.set()

    # -- lifecycle -------------------------------------------------------------------
    def stop(self) -> None:
        """Stop taking turns; in-flight batches finish."""
        self._stopping.set()
        self._changed.set()

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._stopping.is_set()

    async def run(self, *, burst: bool = False) -> None:
        """Run the lanes, the wake-up watcher and housekeeping until stopped (with
        ``burst``: until every destination that can send is drained; a held one's events
        stay queued); then leave every sender."""
        lanes = [asyncio.create_task(self._lane(i)) for i in range(self.lane_count)]
        helpers = [
            asyncio.create_task(self._watch()),
            asyncio.create_task(Housekeeping(self, burst=burst).run()),
        ]
        try:
            await self._stopping.wait()
            _, pending = await asyncio.wait(lanes, timeout=self.settings.shutdown_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for task in (*helpers, *lanes):
                task.cancel()
            await asyncio.gather(*helpers, *lanes, return_exceptions=True)
            for seat in list(self._seats.values()):
                await seat.sender.leave()
            await self._sign_off()

    async def _sign_off(self) -> None:
        try:
            async with asyncio.timeout(max(1.0, self.settings.redis_timeout_s)):
                await self.queue.sign_off(self.name)
        except (TimeoutError, redis.exceptions.RedisError) as exc:
            log.warning(
                "could not sign off (%s); status drops this worker within %g s",
                str(exc) or type(exc).__name__,  # a timeout has no text
                LIVENESS_S,
            )

    # -- the lanes -------------------------------------------------------------------
    async def _lane(self, index: int) -> None:
        consumer = f"{self.name}:{index}"
        while not self.stopping:
            self._changed.clear()
            picked = self._pick()
            if picked is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), IDLE_WAIT_S)
                continue
            name, seat, activations = picked
            started = time.monotonic()
            # The turn is a task of its own, so that removing its destination can cancel
            # it (and only it) once the shutdown timeout has passed.
            turn = asyncio.create_task(
                seat.sender.take_turn(consumer, fill=not self._others_waiting(name))
            )
            seat.begin(turn)
            try:
                await asyncio.wait({turn})
            except asyncio.CancelledError:
                turn.cancel()
                await asyncio.gather(turn, return_exceptions=True)
                raise
            finally:
                seat.end(turn)
                self._changed.set()
            sent = not turn.cancelled() and turn.exception() is None and turn.result()
            if sent:
                seat.took(time.monotonic() - started)
            if (
                not sent
                and not seat.sender.has_reclaimed()
                and self._seats.get(name) is seat
                and self.active.get(name) == activations
            ):
                del self.active[name]  # read empty, and not activated since

    def _eligible(self) -> Iterator[tuple[str, _Seat]]:
        # Slow destinations (turns over SLOW_TURN_S) together hold at most half the lanes,
        # however many there are.
        slow = sum(s.batches for n in self.active if (s := self._seats.get(n)) and s.slow)
        for name in self.active:
            seat = self._seats.get(name)
            if (
                seat is not None
                and not seat.sender.stopping
                and not seat.sender.held
                and seat.batches < self.per_destination
                and not (seat.slow and slow >= self.lane_count // 2)
            ):
                yield name, seat

    def _pick(self) -> tuple[str, _Seat, int] | None:
        """The eligible destination with the fewest batches in flight; ties in turn."""
        candidates = list(self._eligible())
        if not candidates:
            return None
        self._turn += 1
        start = self._turn % len(candidates)
        order = candidates[start:] + candidates[:start]
        name, seat = min(order, key=lambda c: c[1].batches)
        return name, seat, self.active[name]

    def _others_waiting(self, name: str) -> bool:
        return any(other != name for other, _ in self._eligible())

    # -- wake-ups --------------------------------------------------------------------
    async def _watch(self) -> None:
        """Follow the wake stream and the active set; never ends on an error."""
        client = self.settings.async_redis(
            socket_timeout=self.settings.redis_timeout_s + WAKE_BLOCK_MS / 1000
        )
        last = b"0-0"
        loop = asyncio.get_running_loop()
        refreshed = float("-inf")
        try:
            while not self.stopping:
                try:
                    if loop.time() - refreshed >= REFRESH_S:
                        for member in await client.smembers(self.keys.active):  # type: ignore[misc]
                            self.activate(member.decode())
                        refreshed = loop.time()
                    resp = await client.xread(
                        {self.keys.wake: last}, count=1000, block=WAKE_BLOCK_MS
                    )
                except redis.exceptions.RedisError as exc:
                    await asyncio.sleep(self.trouble.failed(exc, "watching for queued events"))
                    continue
                for _, rows in resp or ():
                    for sid, fields in rows:
                        last = sid
                        self.activate(fields.get(b"d", b"").decode())
        finally:
            await client.aclose()

    # -- what this worker does, for status --------------------------------------------
    def state(self) -> tuple[str, str, str]:
        """What this worker is doing: a state, a detail line, and the destinations."""
        senders = list(self.senders.values())
        if not senders and (starting := dict(self.metrics.starting)):
            detail = "; ".join(f"{n}: {why}" for n, why in starting.items())
            return "starting", detail, ", ".join(starting) if len(starting) <= 5 else ""
        # Destinations still in their startup key check, waiting on something (an endpoint
        # that does not answer): named beside those served, not left unsaid.
        waiting = self.metrics.waiting_starts()
        names = [s.destination.name for s in senders] + list(waiting)
        where = ", ".join(names) if len(names) <= 5 else f"{len(names)} destinations"
        if waiting:
            state, detail, _ = self._serving_state(senders, where)
            starts = "; ".join(f"{n}: {why}" for n, why in list(waiting.items())[:WAITS_SAID])
            return state, f"{detail}; {starts}" if detail else starts, where
        return self._serving_state(senders, where)

    def _serving_state(self, senders: list[Sender], where: str) -> tuple[str, str, str]:
        """What this worker does for the destinations it serves (see :meth:`state`)."""
        if len(senders) == 1:
            return (*senders[0].state(), where)
        if not self.trouble.redis_ok:
            return "waiting for Redis", self.trouble.describe(), where
        states = {s.destination.name: s.state()[0] for s in senders}
        notes = [f"{n}: {st}" for n, st in states.items() if st not in ("idle", "sending")]
        detail = "; ".join(notes[:10]) + (f"; and {len(notes) - 10} more" if notes[10:] else "")
        kinds = set(states.values())
        if "sending" in kinds:
            in_flight = sum(s.in_flight for s in senders)
            return "sending", detail or f"{in_flight} events in flight", where
        if "waiting for the endpoint" in kinds:
            return "waiting for the endpoint", detail, where
        if kinds == {"held"}:
            return "held", detail, where
        return "idle", detail or "nothing queued", where


async def run_sender(sender: Sender, *, burst: bool = False) -> None:
    """Send one destination's events on lanes of its own until ``sender`` is stopped (with
    ``burst``: until drained). A worker serving several destinations runs one
    :class:`Lanes` for all of them instead (:class:`capi.worker.runner.Fleet`)."""
    lanes = Lanes(
        sender.settings,
        sender.redis,
        name=sender.name,
        metrics=sender.metrics.parent,
        clock=sender.clock,
    )
    await sender.start()
    lanes.add(sender)

    async def stop_with_it() -> None:
        await sender.stopped()
        lanes.stop()

    watch = asyncio.create_task(stop_with_it())
    try:
        await lanes.run(burst=burst)
    finally:
        sender.stop()
        await watch


class _Seat:
    """A destination's place on the lanes: its sender, the turns it has in flight, and a
    moving average of how long a turn takes. Written by its own methods only."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender
        self.turns: set[asyncio.Task[bool]] = set()
        self._turn_s = 0.0

    @property
    def batches(self) -> int:
        """Batches of this destination that lanes are working on now."""
        return len(self.turns)

    @property
    def slow(self) -> bool:
        """Whether its turns take over ``SLOW_TURN_S`` on average."""
        return self._turn_s > SLOW_TURN_S

    def begin(self, turn: asyncio.Task[bool]) -> None:
        """A lane starts a turn."""
        self.turns.add(turn)

    def end(self, turn: asyncio.Task[bool]) -> None:
        """A lane's turn ended (sent, empty, failed or cancelled)."""
        self.turns.discard(turn)

    def took(self, seconds: float) -> None:
        """A turn that sent a batch took ``seconds``."""
        self._turn_s = seconds if not self._turn_s else 0.7 * self._turn_s + 0.3 * seconds
