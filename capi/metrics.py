"""Prometheus metrics and health endpoints of a worker.

``serve(metrics, port, host)`` starts a small HTTP server in a thread (loopback by default,
at most 16 connections, each dropped after 5 s idle) with:

- ``/metrics``: the counters, histograms and gauges below (prometheus text format);
- ``/healthz``: liveness: 200 while the worker's event loop runs: a task that does nothing
  else beats every :data:`capi.clock.HEARTBEAT_S`, so a Redis that is frozen or away
  does not make a healthy worker look stuck (a restart would not help it);
- ``/readyz``: readiness: 200 when Redis answered within the liveness window
  (:data:`capi.clock.LIVENESS_S`) and some destination can send (its key not held, its
  endpoint not failing); the others are named in the answer. 503 ``starting: ...``
  while the startup key check is under way.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from capi.clock import LIVENESS_S
from capi.errors import ConfigError
from capi.failures import Reason

# What a destination's start waits for before its first check has answered (see
# capi.worker.startup); readiness names only the checks that wait on something else.
UNDER_WAY = "key check under way"
# At most this many waiting checks named in /readyz's answer and a worker's status line.
WAITS_SAID = 10


class Metrics:
    """Every metric a worker exports, in a registry of its own.

    Event and queue metrics carry a ``destination`` label; a sender writes through its
    :meth:`for_destination` view. Redis and liveness are the process's own.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        d = ["destination"]
        self.delivered = Counter("capi_events_delivered", "Events the API accepted.", d, registry=r)
        self.with_identifier = Counter(
            "capi_events_delivered_with_identifier",
            "Delivered events carrying each identifier kind (match coverage: divide by "
            "capi_events_delivered_total); kind any_strong: at least one of email, phone, "
            "external_id, oppref.",
            [*d, "kind"],
            registry=r,
        )
        self.validated = Counter(
            "capi_events_validated",
            "Events the API checked and did not save (a validate_only destination).",
            d,
            registry=r,
        )
        self.retried = Counter(
            "capi_events_retried",
            "Events scheduled for another attempt.",
            [*d, "reason"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "capi_events_dead_lettered", "Events dead-lettered.", [*d, "reason"], registry=r
        )
        self.transient_key_failures = Counter(
            "capi_transient_key_failures",
            "Key failures (missing scope, RBAC) that a re-probe showed to be transient.",
            [*d, "reason"],
            registry=r,
        )
        self.accepted_mismatches = Counter(
            "capi_accepted_mismatches",
            "Batches answered 200 whose accepted_events differed from the events sent.",
            d,
            registry=r,
        )
        self.batch_size = Histogram(
            "capi_batch_size_events",
            "Events per request.",
            d,
            buckets=(1, 10, 50, 100, 250, 500, 750, 1000),
            registry=r,
        )
        self.send_latency = Histogram(
            "capi_send_latency_seconds",
            "Time per request to the events endpoint.",
            d,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.queue_depth = Gauge("capi_queue_depth_events", "Events waiting.", d, registry=r)
        self.in_flight = Gauge("capi_in_flight_events", "Events read, fate pending.", d, registry=r)
        self.retries_scheduled = Gauge(
            "capi_retry_batches_scheduled", "Batches waiting for a retry.", d, registry=r
        )
        self.oldest_age = Gauge(
            "capi_oldest_event_age_seconds", "Age of the oldest queued event.", d, registry=r
        )
        self.key_ok = Gauge(
            "capi_key_ok",
            "1 when the destination's key can write events, 0 while it is held (absent while "
            "its startup key check is under way).",
            d,
            registry=r,
        )
        self.endpoint_failing_since = Gauge(
            "capi_endpoint_failing_since_seconds",
            "Unix time since when sends fail (5xx, network); 0 when they do not.",
            d,
            registry=r,
        )
        self.redis_up = Gauge(
            "capi_redis_up", "1 while Redis answers the worker, 0 while it does not.", registry=r
        )
        self.redis_up.set(1)
        self.redis_full = Gauge(
            "capi_redis_full",
            "1 while Redis refuses writes for want of memory (maxmemory under noeviction).",
            registry=r,
        )
        self.last_tick = time.monotonic()
        self.last_redis_ok = 0.0
        self._views: dict[str, DestinationMetrics] = {}
        # Destinations whose startup key check is under way, with what it waits for
        # (written through starting_for/started; readiness and the heartbeat read it).
        self.starting: dict[str, str] = {}

    def for_destination(self, name: str) -> DestinationMetrics:
        """The view a destination's sender writes through (its label filled in)."""
        if name not in self._views:
            self._views[name] = DestinationMetrics(self, name)
        return self._views[name]

    def starting_for(self, name: str, why: str, view: DestinationMetrics | None = None) -> None:
        """A destination's startup key check is under way, waiting for ``why``; with
        ``view`` (the checking sender's), only while that is still the destination's: the
        check of a destination removed from the file says nothing of one added back."""
        if view is None or self._views.get(name) is view:
            self.starting[name] = why

    def waiting_starts(self) -> dict[str, str]:
        """The destinations whose startup key check waits on something (an endpoint that
        does not answer, Redis), not only under way: what each waits for."""
        return {name: why for name, why in self.starting.items() if why != UNDER_WAY}

    def started(self, name: str, view: DestinationMetrics | None = None) -> None:
        """A destination's startup key check is over (passed, held, refused or stopped);
        ``view`` as for :meth:`starting_for`."""
        if view is None or self._views.get(name) is view:
            self.starting.pop(name, None)

    def forget(self, name: str) -> None:
        """A destination removed from the file: its gauges are no longer exported and
        readiness no longer counts it (its counters stay: they are totals)."""
        view = self._views.pop(name, None)
        if view is not None:
            view.retire()
        self.starting.pop(name, None)
        gauges = (self.queue_depth, self.in_flight, self.retries_scheduled, self.oldest_age)
        for gauge in (*gauges, self.key_ok, self.endpoint_failing_since):
            with contextlib.suppress(KeyError):
                gauge.remove(name)

    def beat(self) -> None:
        """Record that the event loop runs (a task that touches nothing else beats it)."""
        self.last_tick = time.monotonic()

    def redis_answered(self) -> None:
        """Record that Redis answered the worker (readiness)."""
        self.last_redis_ok = time.monotonic()

    def alive(self) -> bool:
        """Liveness: the event loop beat within the liveness window, whatever Redis does."""
        return time.monotonic() - self.last_tick < LIVENESS_S

    def ready(self) -> tuple[bool, str]:
        """Readiness: Redis answered recently, and some destination can send (its key not
        held, its endpoint not failing). While every destination's startup key check is
        under way, not ready, saying what the check waits for."""
        if time.monotonic() - self.last_redis_ok > LIVENESS_S:
            return False, "Redis has not answered recently"
        starting = dict(self.starting)
        views = [v for v in self._views.values() if v.name not in starting]
        if starting and not views:
            return False, "starting: " + "; ".join(
                why if name == "default" else f"{name}: {why}" for name, why in starting.items()
            )
        held = [v.name for v in views if not v.key_can_send()]
        failing = [v.name for v in views if v.endpoint_failing_since._value.get()]
        if views and len(held) == len(views):
            return False, "the Conversion Key is held (see capi status)" + _which(held)
        if views and len(set(held) | set(failing)) == len(views):
            since = min(v.endpoint_failing_since._value.get() or 1e18 for v in views)
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
            return False, f"the endpoint is failing since {at} (see capi status)" + _which(failing)
        # A destination whose startup check waits (its endpoint does not answer) while the
        # others are served: ready, and said (at most ten; a check only under way is not).
        waiting = [f"{n}: {why}" for n, why in self.waiting_starts().items()]
        waits = waiting[:WAITS_SAID]
        if len(waiting) > WAITS_SAID:
            waits.append(f"and {len(waiting) - WAITS_SAID} more waiting")
        if held or failing or waits:
            return True, "ok, but " + ", ".join(
                [f"{n}: key held" for n in held]
                + [f"{n}: endpoint failing" for n in failing]
                + waits
            )
        return True, "ok"

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)


MAX_CONNECTIONS = 16
CONNECTION_TIMEOUT_S = 5.0


class _BoundedServer(ThreadingHTTPServer):
    """A threading HTTP server that serves at most ``max_connections`` connections at once
    (more are closed at once) and drops a connection idle for ``timeout_s``."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int
    ) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _which(names: list[str]) -> str:
    return "" if names == ["default"] else f": {', '.join(names)}"


class DestinationMetrics:
    """One destination's metrics: the labelled children of :class:`Metrics`."""

    def __init__(self, parent: Metrics, name: str) -> None:
        self.parent = parent
        self.name = name
        self.delivered = parent.delivered.labels(name)
        self.validated = parent.validated.labels(name)
        self.with_identifier = _ByReason(parent.with_identifier, name)
        self.accepted_mismatches = parent.accepted_mismatches.labels(name)
        self.batch_size = parent.batch_size.labels(name)
        self.send_latency = parent.send_latency.labels(name)
        self.queue_depth = parent.queue_depth.labels(name)
        self.in_flight = parent.in_flight.labels(name)
        self.retries_scheduled = parent.retries_scheduled.labels(name)
        self.oldest_age = parent.oldest_age.labels(name)
        self._key_ok = parent.key_ok
        self._key_ok_child: Gauge | None = None
        self.endpoint_failing_since = parent.endpoint_failing_since.labels(name)
        self.retried = _ByReason(parent.retried, name)
        self.dead_lettered = _ByReason(parent.dead_lettered, name)
        self.transient_key_failures = _ByReason(parent.transient_key_failures, name)
        self.redis_up = parent.redis_up
        self.redis_full = parent.redis_full
        # Exported at 0 from the start, before anything happens to them: a series born at
        # its first value shows no increase() (a worker's first dead letters of a reason
        # would raise no alert), and while no delivered event carries a strong identifier
        # the coverage ratio (capi-alerts.yml) would have no numerator, hence no alert.
        for reason in Reason:
            self.dead_lettered.labels(reason.value)
        self.with_identifier.labels("any_strong")

    @property
    def key_ok(self) -> Gauge:
        """capi_key_ok of this destination, exported from its first setting on: while the
        startup key check is under way the key's state is not known, and a 0 would read as
        a held key (CapiKeyHeld) when the check only waits for the endpoint."""
        if self._key_ok_child is None:
            self._key_ok_child = self._key_ok.labels(self.name)
        return self._key_ok_child

    def retire(self) -> None:
        """The destination left the file (:meth:`Metrics.forget`): what its sender, still
        stopping, sets from now on is not exported (the other gauges are children taken
        once, which removing their labels detached; this one is taken at its first use)."""
        if self._key_ok_child is None:
            self._key_ok_child = Gauge("capi_key_ok", "retired", registry=None)

    def key_can_send(self) -> bool:
        """Whether the key is known to work (capi_key_ok is 1); read without exporting it."""
        child = cast("Gauge | None", self._key_ok._metrics.get((self.name,)))
        return child is not None and child._value.get() == 1

    def set_depth(self, queued: int, in_flight: int, retries: int, oldest_age_s: float) -> None:
        """Set the queue gauges (from :meth:`capi.queue.Queue.depth`)."""
        self.queue_depth.set(queued)
        self.in_flight.set(in_flight)
        self.retries_scheduled.set(retries)
        self.oldest_age.set(max(0.0, oldest_age_s))


class _ByReason:
    """A counter labelled by destination and one more label (a reason, an identifier kind),
    with the destination filled in."""

    def __init__(self, counter: Counter, destination: str) -> None:
        self.counter = counter
        self.destination = destination

    def labels(self, reason: str) -> Counter:
        return self.counter.labels(self.destination, reason)


def serve(
    metrics: Metrics,
    port: int,
    host: str = "127.0.0.1",
    *,
    timeout_s: float = CONNECTION_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz from a daemon thread; return the server.

    Binds loopback unless told otherwise (``CAPI_METRICS_HOST``). Raises ConfigError naming
    ``CAPI_METRICS_PORT`` when the port is taken.
    """

    class Handler(BaseHTTPRequestHandler):
        timeout = timeout_s  # socket timeout: an idle or slow client is dropped

        def do_GET(self) -> None:
            routes: dict[str, Callable[[], tuple[int, bytes, str]]] = {
                "/metrics": lambda: (200, metrics.exposition(), CONTENT_TYPE_LATEST),
                "/healthz": lambda: (
                    (200, b"alive\n", "text/plain")
                    if metrics.alive()
                    else (503, b"event loop stalled\n", "text/plain")
                ),
                "/readyz": _ready,
            }
            status, body, ctype = routes.get(self.path, lambda: (404, b"", "text/plain"))()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    def _ready() -> tuple[int, bytes, str]:
        ok, why = metrics.ready()
        return (200 if ok else 503), (why + "\n").encode(), "text/plain"

    try:
        server = _BoundedServer((host, port), Handler, max_connections)
    except OSError as exc:
        raise ConfigError(
            f"CAPI_METRICS_PORT: cannot serve metrics on {host}:{port} ({exc.strerror}); "
            "choose a free port (CAPI_METRICS_PORT or --metrics-port), or stop what uses it"
        ) from None
    threading.Thread(target=server.serve_forever, name="capi-metrics", daemon=True).start()
    return server
