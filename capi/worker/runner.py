"""Running a worker: the startup key check, one sender per destination, signals, metrics,
reloading the destinations, shutdown.

``capi worker`` calls :func:`run_worker`, which owns the process: it stops gracefully on
SIGTERM or SIGINT and otherwise runs until stopped, whatever Redis or the endpoint do
(see :mod:`capi.worker.sender`). ``arq workers.main.WorkerSettings`` runs the same
:class:`Fleet` from arq's startup hook.

The startup check refuses to start only on a confirmed key or pixel problem (exit 10-13,
:class:`~capi.errors.KeyCheckFailed`). An endpoint that fails transiently (5xx, 429,
network) or a Redis that is away is waited out with backoff, and said so in the log, on
``/readyz`` (``starting: key check waiting for ...``) and in ``capi status`` (a worker
``starting``): :class:`~capi.worker.startup.StartupWatch` keeps the metrics and the
heartbeat true meanwhile.

With several destinations (``config/destinations.toml``) each gets a sender of its own:
its own key guard, retries and endpoint state. They share the worker's lanes
(:mod:`capi.worker.lanes`, fair turns: a held destination holds none of them, a slow one at
most a quarter),
its housekeeping and one Redis pool, so a broken key or a slow endpoint costs the others
little, and a thousand idle destinations cost little more than one. Startup key checks
run at most ``STARTUP_CHECKS_AT_ONCE`` at a time. A destination whose key is confirmed
broken at start is held
(said in the log and in ``capi status``) while the others are served, unless
``CAPI_STRICT_KEY_CHECK`` asks to refuse the start. The file is read again when it
changes or on SIGHUP: destinations added are served, removed ones stopped (their queued
events stay queued), changed ones restarted; a broken file is refused, with its line and
reason, and the running destinations go on as they were.

A burst worker (``--burst``: drain, then exit) is the exception to waiting Redis out: run
from cron or a deploy step, it should end. When Redis (on a cluster, any master) has not
answered for ``CAPI_REDIS_TIMEOUT_S``, at start or while draining, it stops (in-flight
batches finish, the rest stays queued) and raises :class:`~capi.errors.QueueUnavailable`
(``capi worker`` exits 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Sequence
from http.server import ThreadingHTTPServer

import httpx
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.exceptions

from capi import clock, destinations, logs
from capi.client import http_pool
from capi.clock import HEARTBEAT_S
from capi.destinations import Destination
from capi.errors import ConfigError, KeyCheckFailed, QueueUnavailable, SendError
from capi.keycheck import KeyCheck
from capi.metrics import UNDER_WAY, Metrics, serve
from capi.redisconn import brief, describe, is_cluster, settings_hint
from capi.settings import Settings
from capi.trouble import classify
from capi.worker import decisions
from capi.worker.lanes import Lanes
from capi.worker.sender import Sender, redis_pool
from capi.worker.startup import StartupWatch

log = logging.getLogger("capi.worker")

CHECK_BACKOFF_FIRST_S = 1.0
CHECK_BACKOFF_CAP_S = 30.0
RELOAD_CHECK_S = 2.0
STARTUP_CHECKS_AT_ONCE = 8
# How often a burst worker asks whether Redis answers (see _give_up_without_redis).
BURST_PING_EVERY_S = 0.5


def configure_logging(settings: Settings, keys: Sequence[str] = ()) -> None:
    """The worker's log lines, as the settings ask, with every key redacted."""
    logs.configure(
        json=settings.log_format == "json",
        level=getattr(logging, settings.log_level.upper()),
        key=keys[0] if keys else "",
    )
    for key in keys[1:]:
        logs.redact_also(key)


async def start_sender(
    settings: Settings,
    metrics: Metrics,
    *,
    stopping: asyncio.Event | None = None,
    destination: Destination | None = None,
    hold_if_broken: bool = False,
    pool: aioredis.Redis | None = None,
    http: httpx.AsyncClient | None = None,
    checks: asyncio.Semaphore | None = None,
) -> Sender | None:
    """A sender whose key passed the startup check; None if a stop came first.

    Raises :class:`KeyCheckFailed` when the key or pixel is confirmed broken, unless
    ``hold_if_broken``: then the destination is held (housekeeping re-probes it, and it
    resumes once the key is fixed) and the sender is returned all the same. The sender uses
    ``pool`` and ``http`` (a worker's shared Redis and HTTP pools) if given; ``checks``
    limits how many destinations check their keys at once.
    """
    dest = destination or destinations.default(settings)
    sender = Sender.from_settings(settings, dest, metrics=metrics, redis=pool, http=http)
    metrics.starting_for(dest.name, UNDER_WAY, sender.metrics)
    try:
        return await _checked(sender, metrics, stopping or asyncio.Event(), checks, hold_if_broken)
    finally:
        metrics.started(dest.name, sender.metrics)


async def _checked(
    sender: Sender,
    metrics: Metrics,
    stop: asyncio.Event,
    checks: asyncio.Semaphore | None,
    hold_if_broken: bool,
) -> Sender | None:
    """:func:`start_sender`'s check loop; says in ``metrics.starting`` what it waits for."""
    checks = checks or asyncio.Semaphore(1)
    dest = sender.destination
    name = dest.name
    wait_s = CHECK_BACKOFF_FIRST_S
    while not stop.is_set():
        sent = sender.trouble.now()
        try:
            result = await _check_unless_stopped(sender, checks, stop)
            if result is None:
                break
        except redis.exceptions.RedisError as exc:
            delay = sender.trouble.failed(exc, "the startup key check")
            metrics.starting_for(
                name, f"key check waiting for Redis ({sender.trouble.describe()})", sender.metrics
            )
        else:
            sender.trouble.ok(sent=sent)
            await _endpoint_seen(sender, None if result.ok else result.error)
            if result.ok:
                log.info(
                    "destination %s: key %s can write events to pixel %s; sender starting",
                    name,
                    result.key_fingerprint,
                    dest.pixel_id,
                )
                return sender
            assert result.error is not None and result.diagnosis is not None
            if not result.error.retryable:
                if not hold_if_broken:
                    await sender.aclose()
                    raise KeyCheckFailed(result.diagnosis.text, result.error)
                await sender.durably("holding a broken key", functools.partial(sender.hold, result))
                log.error(
                    "destination %s is held: %s; its events stay queued, the other "
                    "destinations are served; it resumes by itself once a re-probe passes",
                    name,
                    result.diagnosis.cause,
                )
                return sender
            delay, wait_s = wait_s, min(wait_s * 2, CHECK_BACKOFF_CAP_S)
            metrics.starting_for(
                name, f"key check waiting for the endpoint ({result.error})", sender.metrics
            )
            log.warning(
                "destination %s: the startup key check could not get an answer about the key "
                "(%s); trying again in %.0f s; queued events stay queued meanwhile",
                name,
                result.error,
                delay,
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
    await sender.aclose()
    return None


async def _endpoint_seen(sender: Sender, error: SendError | None) -> None:
    """What the startup key check says of the endpoint, in Redis. It did not answer (5xx,
    network): marked failing, since while the other destinations are served the worker is
    not "starting" and ``capi status`` would otherwise call it "ok". It answered (the key
    passed, or was refused: any answer but a failure of the endpoint itself, as
    :meth:`Sender.probe_endpoint` takes it): a failing mark (its own, or one a stopped
    worker left) ends, as after a delivery (a held destination does not probe its
    endpoint). Best effort: Redis in trouble is said by the next check."""
    with contextlib.suppress(redis.exceptions.RedisError):
        if error is not None and decisions.fate(error.reason).endpoint_down:
            await sender.queue.endpoint_failed(clock.now_ms(), str(error)[:300])
        elif await sender.queue.endpoint_marked_failing():
            await sender.queue.endpoint_answered(clock.now_ms())


class Fleet:
    """The senders of one worker process, one per destination it serves, on shared lanes."""

    def __init__(self, settings: Settings, metrics: Metrics, *, only: Sequence[str] = ()):
        self.settings = settings
        self.metrics = metrics
        self.only = list(only)
        self.stopping = asyncio.Event()
        self.redis = redis_pool(settings)
        self.lanes = Lanes(settings, self.redis, metrics=metrics)
        # One HTTP pool for every destination (all usually send to the same API host).
        self.http = http_pool(settings.request_timeout_s, 2 * self.lanes.lane_count + 8)
        # Senders checked by start() before run(), handed to the lanes by _serve (the lanes
        # track the senders they serve; the fleet tracks destinations and their tasks).
        self._checked: dict[str, Sender] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stops: dict[str, asyncio.Event] = {}
        self._retiring: list[asyncio.Task[None]] = []
        self._serving: dict[str, Destination] = {}
        self._reload = asyncio.Event()
        self._file_stamp: tuple[str, float] | None = None
        self._checks = asyncio.Semaphore(STARTUP_CHECKS_AT_ONCE)
        self._alive: asyncio.Task[None] | None = None
        self.destinations = self._select(destinations.load(settings))
        self.single = len(self.destinations) == 1
        self._startup = StartupWatch(metrics, self.redis, settings.keys, self.lanes.name)
        self._watching: asyncio.Task[None] | None = None

    def _select(self, found: dict[str, Destination]) -> dict[str, Destination]:
        unknown = [n for n in self.only if n not in found]
        if unknown:
            raise ConfigError(
                f"--destination {unknown[0]!r} is not configured; the destinations are: "
                + ", ".join(sorted(found))
            )
        return {n: d for n, d in found.items() if not self.only or n in self.only}

    def api_keys(self) -> list[str]:
        """Every key this fleet uses (for the log redaction)."""
        return [d.api_key for d in self.destinations.values()]

    async def start(self) -> bool:
        """The startup check of a single destination (raises KeyCheckFailed if it is
        broken; False if a stop came first). With several, each is checked as it starts,
        in :meth:`run`."""
        self._beat()
        self._watch_startup()
        if not (self.single or self.settings.strict_key_check):
            return True
        started = False
        try:
            for dest in self.destinations.values():
                sender = await start_sender(
                    self.settings,
                    self.metrics,
                    stopping=self.stopping,
                    destination=dest,
                    pool=self.redis,
                    http=self.http,
                    checks=self._checks,
                )
                if sender is None:
                    return False
                self._checked[dest.name] = sender
            started = True
            return True
        finally:
            if not started:  # no lanes will follow: this worker was only starting
                await self._unwatch_startup()

    def _watch_startup(self) -> None:
        if self._watching is None:
            self._watching = asyncio.create_task(self._startup.run())

    async def _unwatch_startup(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
            self._watching = None
        await self._startup.sign_off()

    def stop(self) -> None:
        """Stop every sender: in-flight batches finish, the rest stays queued."""
        self.stopping.set()
        for stop in self._stops.values():
            stop.set()

    def reload(self) -> None:
        """Read the destinations file again now (SIGHUP)."""
        self._reload.set()

    def _beat(self) -> None:
        """Start the liveness beat (``/healthz``), from the startup checks on."""
        if self._alive is None:
            self._alive = asyncio.create_task(_beat_while_running(self.metrics))

    async def _stop_beat(self) -> None:
        if self._alive is not None:
            self._alive.cancel()
            await asyncio.gather(self._alive, return_exceptions=True)
            self._alive = None

    async def aclose(self) -> None:
        """Close what :meth:`start` opened, when :meth:`run` is not to follow."""
        await self._stop_beat()
        await self._unwatch_startup()
        for sender in self._checked.values():
            await sender.aclose()
        self._checked.clear()
        await self.redis.aclose()
        await self.http.aclose()

    async def run(self, *, burst: bool = False) -> None:
        """Serve every destination until stopped (with ``burst``: until all that can send
        are drained)."""
        self._beat()
        self.lanes.expect(len(self.destinations))
        self._watch_startup()
        self._startup.alone = False  # the lanes' housekeeping speaks for the worker now
        lanes = asyncio.create_task(self.lanes.run(burst=burst))
        for dest in self.destinations.values():
            self._launch(dest)
        stopped = asyncio.create_task(self.stopping.wait())
        watcher = None
        try:
            if not burst:
                self._file_stamp = destinations.file_stamp(self.settings)
                watcher = asyncio.create_task(self._watch())
            await asyncio.wait({lanes, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watcher, stopped):
                if task is not None:
                    task.cancel()
            self.stop()
            await asyncio.gather(*self._tasks.values(), *self._retiring, return_exceptions=True)
            self.lanes.stop()
            await asyncio.gather(lanes, return_exceptions=True)
            await self._stop_beat()
            if self._watching is not None:
                self._watching.cancel()
                await asyncio.gather(self._watching, return_exceptions=True)
            await self.redis.aclose()
            await self.http.aclose()

    def _launch(self, dest: Destination) -> None:
        self._serving[dest.name] = dest
        stop = self._stops[dest.name] = asyncio.Event()
        task = asyncio.create_task(self._serve(dest, stop))
        self._tasks[dest.name] = task

        def ended(done: asyncio.Task[None]) -> None:
            if not done.cancelled() and done.exception() is not None:
                log.error("destination %s: its sender ended: %s", dest.name, done.exception())

        task.add_done_callback(ended)

    async def _serve(self, dest: Destination, stop: asyncio.Event) -> None:
        """Check a destination's key, serve it on the lanes until ``stop``, then take it
        off them (its in-flight batches finish)."""
        starting = True
        sender = self._checked.pop(dest.name, None)
        try:
            if sender is None:
                sender = await start_sender(
                    self.settings,
                    self.metrics,
                    stopping=stop,
                    destination=dest,
                    hold_if_broken=True,
                    pool=self.redis,
                    http=self.http,
                    checks=self._checks,
                )
                if sender is None:
                    return
                if stop.is_set():  # removed or changed while its key was being checked
                    return
            stopper = asyncio.create_task(_stop_when(stop, sender))
            await sender.start()
            if not sender.stopping:
                self.lanes.add(sender)
            self.lanes.started()
            starting = False
            await stop.wait()
            await stopper
            await self.lanes.remove(sender)
        finally:
            if starting:
                self.lanes.started()
            if sender is not None:
                await sender.aclose()

    async def _watch(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload.wait(), RELOAD_CHECK_S)
            asked = self._reload.is_set()
            self._reload.clear()
            stamp = destinations.file_stamp(self.settings)
            if not asked and stamp == self._file_stamp:
                continue
            self._file_stamp = stamp
            try:
                found = self._select(destinations.load(self.settings))
            except ConfigError as exc:
                log.error("destinations not reloaded, the running ones go on: %s", exc)
                continue
            self._apply(found)

    def _apply(self, found: dict[str, Destination]) -> None:
        """Stop the senders of destinations removed or changed, start the new ones. Never
        waits: a stopping sender finishes its in-flight batch on its own."""
        for name in list(self._serving):
            if name in found and found[name] == self._serving[name]:
                continue
            log.warning(
                "destination %s: %s in the file; stopping its sender (its queued events stay "
                "queued)",
                name,
                "changed" if name in found else "removed",
            )
            self._stops.pop(name).set()
            self._retiring.append(self._tasks.pop(name))
            if name not in found:
                self.metrics.forget(name)
            del self._serving[name]
        self._retiring = [t for t in self._retiring if not t.done()]
        for name, dest in found.items():
            if name not in self._serving:
                log.warning("destination %s: serving (pixel %s)", name, dest.pixel_id)
                logs.redact_also(dest.api_key)
                self._launch(dest)
        self.destinations = found


async def run(settings: Settings, *, burst: bool = False, only: Sequence[str] = ()) -> None:
    """Check the key(s), then send until SIGTERM/SIGINT (or, with ``burst``, until drained)."""
    metrics = Metrics()
    fleet = Fleet(settings, metrics, only=only)
    configure_logging(settings, fleet.api_keys())
    http: ThreadingHTTPServer | None = None
    if settings.metrics_port is not None:
        http = serve(metrics, settings.metrics_port, settings.metrics_host)
        log.info(
            "metrics and health on %s:%d (/metrics, /healthz, /readyz)",
            settings.metrics_host,
            settings.metrics_port,
        )

    def on_signal(signum: signal.Signals) -> None:
        log.info("%s: stopping; in-flight batches finish, the rest stays queued", signum.name)
        fleet.stop()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, fleet.reload)
    watch = asyncio.create_task(_give_up_without_redis(fleet, settings)) if burst else None
    try:
        if await fleet.start():
            await fleet.run(burst=burst)
    finally:
        gave_up = await _ended(watch)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if http is not None:
            http.shutdown()
    if gave_up is not None:
        raise gave_up


async def _ended(watch: asyncio.Task[QueueUnavailable | None] | None) -> QueueUnavailable | None:
    """What a burst worker's Redis watch gave up with (None: it did not), once it is over."""
    if watch is None:
        return None
    watch.cancel()  # a no-op if it gave up
    await asyncio.gather(watch, return_exceptions=True)
    if watch.cancelled():
        return None
    if watch.exception() is not None:  # a bug in the watch must not fail a drained burst
        log.error("burst: the watch on Redis failed: %r", watch.exception())
        return None
    return watch.result()


async def _give_up_without_redis(fleet: Fleet, settings: Settings) -> QueueUnavailable | None:
    """A burst worker's limit on waiting for Redis: once it has not answered a PING for
    ``CAPI_REDIS_TIMEOUT_S`` (at start or while draining), stop the fleet and return the
    error to raise; runs until cancelled otherwise. The time counts from the first PING
    left unanswered, not from the last one answered (Redis may have gone away up to
    ``BURST_PING_EVERY_S`` after it): an outage shorter than the timeout is waited out."""
    patience_s = settings.redis_timeout_s
    unanswered_since: float | None = None
    while True:
        asked = time.monotonic()
        try:
            async with asyncio.timeout(patience_s):
                await _ping(fleet.redis)
            unanswered_since = None
        except (redis.exceptions.RedisError, TimeoutError) as exc:
            if unanswered_since is None:
                unanswered_since = asked
            if time.monotonic() - unanswered_since >= patience_s:
                fleet.stop()
                return _gave_up(fleet.redis, exc, patience_s)
        await asyncio.sleep(BURST_PING_EVERY_S)


def _gave_up(client: aioredis.Redis, exc: Exception, patience_s: float) -> QueueUnavailable:
    """The error a burst gives up with (logged): Redis did not answer, or it answered every
    PING with an error (a wrong password, loading its data set...), which is named."""
    cause = f"{type(exc).__name__}: {brief(exc)}" if str(exc) else type(exc).__name__
    kind, meaning = classify(exc)
    if kind in ("unreachable", "unexpected"):  # unexpected: the PING's own time limit
        log.error("burst: Redis has not answered for %g s; giving up", patience_s)
        what = "could not be reached or did not answer"
    else:
        log.error("burst: Redis refused every PING for %g s (%s); giving up", patience_s, meaning)
        what = f"refused every PING for {patience_s:g} s: {meaning}"
    return QueueUnavailable(
        f"Redis at {describe(client)} {what} ({cause[:300]}); capi worker --burst gave up "
        f"after {patience_s:g} s (CAPI_REDIS_TIMEOUT_S): queued events stay queued. Check "
        f"{settings_hint(client)}.",
        maybe_stored=False,
    )


async def _ping(client: aioredis.Redis) -> None:
    """PING Redis; on a cluster, every master (a plain PING asks one node, which may answer
    while the master holding a destination's keys is gone)."""
    if is_cluster(client):
        await client.ping(target_nodes=aiocluster.RedisCluster.PRIMARIES)
    else:
        await client.ping()


async def _check_unless_stopped(
    sender: Sender, checks: asyncio.Semaphore, stop: asyncio.Event
) -> KeyCheck | None:
    """The sender's key check, once a check slot is free; None if a stop comes first
    (while waiting for the slot, or during the check, which is then cancelled)."""
    stopped = asyncio.create_task(stop.wait())
    check = asyncio.create_task(_check_in_slot(sender, checks, stop))
    try:
        await asyncio.wait({stopped, check}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (stopped, check):
            if not task.done():
                task.cancel()
        await asyncio.gather(stopped, check, return_exceptions=True)
    if check.cancelled():
        return None
    return check.result()


async def _check_in_slot(
    sender: Sender, checks: asyncio.Semaphore, stop: asyncio.Event
) -> KeyCheck | None:
    async with checks:
        if stop.is_set():
            return None
        return await sender.check_key()


async def _beat_while_running(metrics: Metrics) -> None:
    """Say the event loop runs (liveness, ``/healthz``) every ``HEARTBEAT_S``: this task
    waits for nothing else (not Redis, not the endpoint), so only a stuck process stops it."""
    while True:
        metrics.beat()
        await asyncio.sleep(HEARTBEAT_S)


async def _stop_when(stop: asyncio.Event, sender: Sender) -> None:
    await stop.wait()
    sender.stop()


def run_worker(settings: Settings, *, burst: bool = False, only: Sequence[str] = ()) -> None:
    """Run a worker process until stopped; raise KeyCheckFailed if a key is broken."""
    asyncio.run(run(settings, burst=burst, only=only))
