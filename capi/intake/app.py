"""The HTTP intake: a plain ASGI application in front of the queue (``capi serve``).

Routes (the OpenAPI document, :mod:`capi.intake.openapi`, describes each answer):

- ``POST /v1/events[?destination=NAME]`` with ``Authorization: Bearer <intake token>``:
  every event goes through :meth:`capi.producer.Producer.enqueue_many`, so it is validated
  and hashed exactly as a Python producer would (the events of concurrent requests share
  one Redis round trip: :mod:`capi.grouping`), and answered one by one, in order
  (``queued``, ``duplicate``, ``skipped`` (consent denied) or ``refused`` with each field
  and rule; ``warnings`` name invalid optional identifiers left out);
- ``GET /healthz`` (the process answers), ``GET /readyz`` (Redis answers a PING and is not full,
  and a replica can confirm writes under ``CAPI_ENQUEUE_DURABILITY=replica``, its
  append-only file under ``aof``),
  ``GET /metrics`` (Prometheus), ``GET /openapi.json``.

The order of checks on ``POST /v1/events``: token (401), destination (403), content type
(415), size (413), envelope (400), then the events; nothing is queued unless all pass.
While Redis is away or full the answer is 503 with ``Retry-After``, and its ``results``
say which events Redis had already taken, so the same request can be sent again (the
event id dedups). Access logs carry no body and no token (only the first 8 hex characters
of its SHA-256, to tell clients apart).

No framework: routing is a dict lookup, which keeps a single-event request cheap (see the
docs/performance.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import orjson
import redis.exceptions
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from capi import destinations
from capi.durability import QUEUED_IN_MEMORY, Durability
from capi.errors import ConfigError, EventRejected, Problem, QueueFull, QueueUnavailable
from capi.events import Unreadable
from capi.fingerprint import looks_like_key
from capi.intake import envelope, guard, openapi, tokens
from capi.logs import JsonFormatter
from capi.producer import EnqueueReport, Producer
from capi.redisconn import is_cluster
from capi.settings import Settings
from capi.status import (
    cluster_confirming,
    cluster_memory,
    confirming,
    redis_full,
    replicas_of,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("capi.intake")
access_log = logging.getLogger("capi.intake.access")
EVENTS_PATH = "/v1/events"
FREE_BODY_BYTES = 65_536  # each request's first bytes are outside the shared budget


class IntakeMetrics:
    """The intake's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "capi_intake_requests", "HTTP requests answered, by status.", ["status"], registry=r
        )
        self.events = Counter(
            "capi_intake_events",
            "Events answered by POST /v1/events, by outcome and destination.",
            ["outcome", "destination"],
            registry=r,
        )
        self.latency = Histogram(
            "capi_intake_request_duration_seconds",
            "Time to answer a request.",
            ["route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.waiting = Gauge(
            "capi_intake_events_waiting",
            "Events of requests in progress that wait for their Redis round trip, or are in it.",
            registry=r,
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once (a request's statuses, routes and
        destinations are few)."""
        found = self._children.get((metric, *labels))
        if found is None:
            found = self._children[(metric, *labels)] = metric.labels(*labels)
        return found


class AccessLines:
    """The access lines of the requests answered in one turn of the event loop, given to
    logging as one record at the turn's end (:class:`AccessFormatter` writes a line for
    each): a record per request cost about 13 us of the logging module's own work (the
    record, its filters and handlers), a tenth of a single-event request's CPU."""

    def __init__(self) -> None:
        self._lines: list[tuple[float, str, dict[str, Any]]] = []
        self._scheduled: asyncio.AbstractEventLoop | None = None

    def add(self, message: str, fields: dict[str, Any]) -> None:
        """An access line (its message and fields) for the end of this turn."""
        self._lines.append((time.time(), message, fields))
        loop = asyncio.get_running_loop()
        if self._scheduled is not loop:  # none yet, or on a loop that stopped before it ran
            self._scheduled = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Log the lines waiting, as one record of ``capi.intake.access``."""
        self._scheduled = None
        if self._lines:
            lines, self._lines = self._lines, []
            access_log.info("%d requests answered", len(lines), extra={"access_lines": lines})


class Answer(Exception):
    """Raised to end a request with a JSON error answer (never with a body's content)."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


class Intake:
    """The ASGI application; the producer is made at lifespan startup, in the server's loop."""

    def __init__(self, settings: Settings, *, warned: bool = False) -> None:
        """``warned``: see :class:`~capi.intake.tokens.Grants`."""
        self.settings = settings
        self.grants = tokens.Grants(settings, warned=warned)
        self.limits = guard.Limits.of(settings)  # the connection guard's (capi.intake.guard)
        self.buffered = 0  # body bytes held now, beyond each request's FREE_BODY_BYTES
        self.metrics = IntakeMetrics()
        self.access = AccessLines()
        self.producer: Producer | None = None
        self._openapi = orjson.dumps(openapi.document())
        self._routes: dict[tuple[str, str], Callable[..., Awaitable[tuple[int, bytes, str]]]] = {
            ("GET", "/healthz"): self._healthz,
            ("GET", "/readyz"): self._readyz,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/openapi.json"): self._openapi_json,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.producer = Producer.from_settings(
                    self.settings,
                    registry=self.metrics.registry,
                    group_events=self.settings.intake_group_events,
                )
                self.metrics.waiting.set_function(self._waiting)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.access.flush()
                if self.producer is not None:
                    await self.producer.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        method, path = scope["method"], scope["path"]
        raw_path = scope.get("raw_path")
        if raw_path and b"%" in raw_path:  # a route is never percent-encoded: answered as
            # what was sent (decoded, "/%6Detrics" was /metrics, past a proxy that denies
            # /metrics by its path as sent, making every client local)
            path = raw_path.decode("latin-1")
        note: dict[str, Any] = {}
        headers: dict[str, str] = {}
        try:
            if path == EVENTS_PATH:
                if method != "POST":
                    raise Answer(405, "method_not_allowed", "use POST", {"allow": "POST"})
                status, body = await self._events(scope, receive, note)
                ctype = "application/json"
            elif (method, path) == ("GET", "/metrics") and not self._may_see_metrics(scope):
                raise Answer(
                    403,
                    "forbidden",
                    "/metrics answers clients on this host, or with an intake token "
                    "(Authorization: Bearer <token>)",
                )
            elif (method, path) in self._routes:
                status, body, ctype = await self._routes[method, path]()
            elif method != "GET" and ("GET", path) in self._routes:
                raise Answer(405, "method_not_allowed", "use GET", {"allow": "GET"})
            else:
                raise Answer(404, "not_found", f"no such path; POST {EVENTS_PATH}")
        except Answer as answer:
            status, ctype, headers = answer.status, "application/json", answer.headers
            body = _error_body(answer.code, answer.message, note.pop("results", None))
        except Exception as exc:  # the one place an unforeseen failure becomes a 500
            log.error("request failed: %s", type(exc).__name__, exc_info=exc)
            status, ctype = 500, "application/json"
            body = _error_body("internal", "the intake failed; see its log", None)
        await _respond(send, status, body, ctype, headers)
        elapsed = time.perf_counter() - started
        metrics = self.metrics
        metrics.child(metrics.requests, str(status)).inc()
        route = path if path == EVENTS_PATH or ("GET", path) in self._routes else "other"
        metrics.child(metrics.latency, route).observe(elapsed)
        if access_log.isEnabledFor(logging.INFO):
            self.access.add(
                f"{method} {route} {status}",
                {**_client(scope), "duration_ms": round(elapsed * 1000, 3), **note},
            )

    async def _events(
        self, scope: Scope, receive: Receive, note: dict[str, Any]
    ) -> tuple[int, bytes]:
        authorization, ctype, length, coding = _request_headers(scope)
        destination = self._authorize(authorization, scope, note)
        kind = _checked(envelope.media_type, ctype)
        if coding:
            raise Answer(
                415,
                "unsupported_content_encoding",
                f"Content-Encoding {coding[:40]!r} is not accepted; send the body uncompressed",
                {"accept-encoding": "identity"},
            )
        body = await self._body(length, receive)
        raw = _checked(envelope.events_of, body, kind, self.settings.intake_max_events)
        note["events"] = len(raw)
        report = EnqueueReport()
        assert self.producer is not None, "lifespan startup made the producer"
        try:
            await self.producer.enqueue_many(
                (_as_event(e) for e in raw), destination, report=report
            )
        except QueueUnavailable as exc:
            note["results"] = _results(raw, report, untaken=_untaken(exc))
            self._count(report, destination)
            raise Answer(
                503,
                "queue_unavailable",
                _unavailable_message(exc, report),
                {"retry-after": str(self.settings.intake_retry_after_s)},
            ) from None
        except EventRejected:  # the destination left the file since the grant was read
            raise Answer(
                403,
                "destination_not_granted",
                f"the destination {destination[:64]!r} is no longer configured",
            ) from None
        except ConfigError as exc:  # the durability check refused, after Redis took the calls
            log.error("cannot enqueue: %s", exc)
            note["results"] = _results(raw, report, untaken="unconfirmed")
            self._count(report, destination)
            raise Answer(
                500,
                "misconfigured",
                "the intake is misconfigured (see its log): the durability promise "
                "(CAPI_ENQUEUE_DURABILITY) cannot be kept, so the events sent are "
                "unconfirmed: Redis may hold them, and they may be delivered (see results)",
            ) from None
        self._count(report, destination)
        note.update(queued=report.queued, duplicates=report.duplicates, refused=len(report.refused))
        answer = {
            "results": _results(raw, report),
            "queued": report.queued,
            "duplicates": report.duplicates,
            "refused": len(report.refused),
            "skipped": sum(1 for i in report.skipped if i not in report.added),
        }
        return 200, orjson.dumps(answer)

    def _authorize(self, header: str | None, scope: Scope, note: dict[str, Any]) -> str:
        """The destination this request may queue to; Answer 401 or 403 if none."""
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Answer(
                401,
                "unauthorized",
                "send an intake token: Authorization: Bearer <token> (capi intake-token makes one)",
                {"www-authenticate": "Bearer"},
            )
        token_digest = tokens.digest(token)
        granted = self.grants.granted_digest(token_digest)
        if granted is None:
            message = "the intake token is not configured"
            if looks_like_key(token):
                message += (
                    ": this looks like an OpenAI key (sk-...); clients send an intake token "
                    "(capi intake-token makes one), never the Conversion Key, which stays "
                    "with capi's workers"
                )
            raise Answer(401, "unauthorized", message, {"www-authenticate": "Bearer"})
        note["token"] = "sha256:" + token_digest[:8]
        query = scope.get("query_string", b"")
        found = parse_qs(query.decode("latin-1"), keep_blank_values=True) if query else {}
        named = found.get("destination")
        if named and len(named) > 1:  # as with two Authorization headers: believe neither
            raise Answer(
                400, "malformed", "the request names ?destination= several times; name one"
            )
        if named == [""]:
            named = None  # ?destination= with no name: as if not named
        if named is None:
            if len(granted) == 1:
                (only,) = granted
                note["destination"] = only
                return only
            raise Answer(
                403,
                "destination_required",
                "this token grants several destinations; name one with ?destination=NAME: "
                + destinations.listed(granted),
            )
        name: str = named[0]
        if name not in granted:
            raise Answer(
                403,
                "destination_not_granted",
                f"this token does not grant the destination {name[:64]!r}",
            )
        note["destination"] = name
        return name

    async def _body(self, length: str | None, receive: Receive) -> bytes:
        limit = self.settings.intake_max_body_bytes
        if length is not None and length.isdigit():
            if int(length) > limit:
                raise Answer(413, "body_too_large", envelope.too_large(limit).message)
            self._reserve(int(length) - FREE_BODY_BYTES, dry_run=True)
        # The whole body within the timeout (a trickle is refused too). What asyncio.timeout
        # does, in its cheapest form: one timer that cancels this task, told apart from any
        # other cancellation by uncancel() (asyncio.timeout cost about 6 us a request).
        timeout_s = self.settings.intake_read_timeout_s
        task = asyncio.current_task()
        assert task is not None, "an ASGI request runs in a task"
        expired, cancelling = False, task.cancelling()

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = task.get_loop().call_later(timeout_s, expire)
        try:
            return await self._read(receive, limit)
        except asyncio.CancelledError:
            if expired and task.uncancel() <= cancelling:
                raise Answer(
                    408,
                    "body_timeout",
                    f"the body did not arrive within CAPI_INTAKE_READ_TIMEOUT_S={timeout_s:g} s",
                    {"connection": "close"},
                ) from None
            raise
        finally:
            timer.cancel()

    async def _read(self, receive: Receive, limit: int) -> bytes:
        """The body; its bytes beyond FREE_BODY_BYTES are counted in :attr:`buffered` while
        it is read (Answer 503 when they would pass CAPI_INTAKE_MAX_BUFFERED_BYTES)."""
        chunks: list[bytes] = []
        size = reserved = 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise Answer(400, "malformed", "the client left before sending the body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise Answer(413, "body_too_large", envelope.too_large(limit).message)
                need = size - FREE_BODY_BYTES - reserved
                if need > 0:
                    self._reserve(need)
                    reserved += need
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        finally:
            self.buffered -= reserved

    def _reserve(self, size: int, *, dry_run: bool = False) -> None:
        """Count ``size`` more body bytes held; Answer 503 if over the process's budget."""
        budget = self.settings.intake_max_buffered_bytes
        if size <= 0:
            return
        if self.buffered + size > budget:
            raise Answer(
                503,
                "busy",
                f"the intake holds {budget:,} bytes of request bodies already "
                "(CAPI_INTAKE_MAX_BUFFERED_BYTES); send the request again after Retry-After",
                {"retry-after": str(self.settings.intake_retry_after_s), "connection": "close"},
            )
        if not dry_run:
            self.buffered += size

    def _may_see_metrics(self, scope: Scope) -> bool:
        """Whether the client is on this host (loopback) or presents a configured token."""
        client = scope.get("client")
        if client and _loopback(client[0]):
            return True
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, token = values[0].decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and self.grants.granted(token.strip()) is not None

    def _count(self, report: EnqueueReport, destination: str) -> None:
        child, events = self.metrics.child, self.metrics.events
        if report.queued:
            child(events, "queued", destination).inc(report.queued)
        if report.duplicates:
            child(events, "duplicate", destination).inc(report.duplicates)
        if report.refused:
            child(events, "refused", destination).inc(len(report.refused))
        skipped = sum(1 for i in report.skipped if i not in report.added)
        if skipped:
            child(events, "skipped", destination).inc(skipped)

    def _waiting(self) -> float:
        return self.producer.waiting if self.producer is not None else 0

    async def _healthz(self) -> tuple[int, bytes, str]:
        return 200, b'{"status": "alive"}', "application/json"

    async def _readyz(self) -> tuple[int, bytes, str]:
        """Ready: Redis answers, is not full, and under ``CAPI_ENQUEUE_DURABILITY=replica``
        has a replica that confirms writes; under ``aof`` (one Redis) it can confirm them in
        its append-only file, without which every POST gets 500. On a cluster, a master
        that is full or has no such replica costs only the destinations whose keys live on
        it (their requests get 503): ready, and said; every master so is not ready. Redis's
        addresses are not shown (the answer is public)."""
        assert self.producer is not None
        client = self.producer.redis
        replica = self.settings.enqueue_durability == "replica"
        try:
            await client.ping()
            if is_cluster(client):
                _, shards = await cluster_memory(client)
                confirmed = await cluster_confirming(client) if replica else {}
                for shard in shards:
                    shard["unconfirmed"] = replica and not confirmed.get(shard["node"], 0)
            else:
                shards = [{"full": redis_full(await client.info("memory"))}]
                if replica and not confirming(replicas_of(await client.info("replication"))):
                    shards[0]["unconfirmed"] = True
                await self._aof_confirms(client)
        except ConfigError as exc:  # every POST gets 500 (misconfigured) until it is fixed
            why = "every POST gets 500: " + str(exc).removesuffix(QUEUED_IN_MEMORY)
            return 503, orjson.dumps({"status": "not ready", "reason": why}), "application/json"
        except redis.exceptions.NoPermissionError:
            shards = []  # INFO denied to capi's Redis user: the PING answered
        except Exception as exc:  # any failure to answer means not ready
            why = f"Redis does not answer ({type(exc).__name__})"
            return 503, orjson.dumps({"status": "not ready", "reason": why}), "application/json"
        full = sum(1 for shard in shards if shard["full"])
        unconfirmed = sum(1 for shard in shards if shard.get("unconfirmed") and not shard["full"])
        if full + unconfirmed and full + unconfirmed == len(shards):  # every POST: 503
            if len(shards) > 1:
                why = "every master of the Redis Cluster is " + (
                    "full (maxmemory reached under noeviction)"
                    if full == len(shards)
                    else "full or has no replica that confirms writes lately "
                    "(CAPI_ENQUEUE_DURABILITY=replica)"
                )
            elif full:
                why = "Redis is full (maxmemory reached under noeviction)"
            else:
                why = (
                    "no replica has acknowledged writes lately, so none can confirm an event "
                    "(CAPI_ENQUEUE_DURABILITY=replica): requests get 503"
                )
            return 503, orjson.dumps({"status": "not ready", "reason": why}), "application/json"
        if full + unconfirmed:
            why = (
                f"{full + unconfirmed} of the {len(shards)} masters of the Redis Cluster are "
                "full (maxmemory reached under noeviction) or have no replica that confirms "
                "writes (CAPI_ENQUEUE_DURABILITY=replica): requests for the destinations whose "
                "keys live there get 503"
            )
            return 200, orjson.dumps({"status": "ready", "degraded": why}), "application/json"
        return 200, b'{"status": "ready"}', "application/json"

    async def _aof_confirms(self, client: Any) -> None:
        """Under CAPI_ENQUEUE_DURABILITY=aof, ConfigError if the server cannot confirm
        writes as it needs (no append-only file, appendfsync other than always, CONFIG GET
        or WAITAOF refused): the enqueue's own check, on a connection that wrote nothing,
        which the wait confirms at once."""
        if self.settings.enqueue_durability != "aof":
            return
        aof = Durability("aof", self.settings.durability_timeout_ms)
        pipe = client.pipeline(transaction=False)
        for command in aof.commands():
            pipe.execute_command(*command)
        aof.check(await pipe.execute(raise_on_error=False))

    async def _metrics(self) -> tuple[int, bytes, str]:
        return 200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST

    async def _openapi_json(self) -> tuple[int, bytes, str]:
        return 200, self._openapi, "application/json"


def _checked(func: Callable[..., Any], *args: Any) -> Any:
    """Call a :mod:`capi.intake.envelope` check, turning its EnvelopeError into an Answer."""
    try:
        return func(*args)
    except envelope.EnvelopeError as exc:
        raise Answer(exc.status, exc.code, exc.message) from None


def _as_event(raw: Any) -> Any:
    """An NDJSON line that was not JSON, as an input prepare() refuses with the line's own
    rule (its answer and its line in capi tail name the line: see :func:`_errors`)."""
    return Unreadable(raw.rule(), kept=raw.kept) if isinstance(raw, envelope.BadLine) else raw


def _results(raw: list[Any], report: EnqueueReport, *, untaken: str = "") -> list[dict[str, Any]]:
    """Each event's answer; ``untaken`` is the status of the events sent that Redis did
    not answer for, when the enqueue failed (:func:`_untaken`; ``unconfirmed`` too when
    Redis took them and the durability promise could not be kept); those never sent (the
    chunks after the one that failed) are ``not_queued``."""
    refused = dict(report.refused)
    results = []
    for i, event in enumerate(raw):
        event_id = event.get("id") if isinstance(event, dict) else None
        item: dict[str, Any] = {
            "index": i,
            "id": event_id if isinstance(event_id, str) else None,
            "status": "",
            "errors": [],
            "warnings": _fields(report.warnings.get(i, ())),
        }
        if i in refused:
            item["status"] = "refused"
            item["errors"] = _errors(refused[i], event)
        elif i in report.added:
            item["status"] = "queued" if report.added[i] else "duplicate"
            item["warnings"] += _fields(report.skipped.get(i, ()))  # skipped elsewhere
        elif i in report.skipped:
            item["status"] = "skipped"
            item["errors"] = _fields(report.skipped[i])
        elif untaken:
            item["status"] = untaken if i in report.sent else "not_queued"
        results.append(item)
    return results


def _untaken(exc: QueueUnavailable) -> str:
    """The status of an event a failed enqueue did not answer for."""
    return "unconfirmed" if exc.maybe_stored else "not_queued"


def _errors(exc: EventRejected, event: Any) -> list[dict[str, str]]:
    if isinstance(event, envelope.BadLine):
        return [{"field": "(event)", "rule": event.rule()}]
    return _fields(exc.problems)


def _fields(problems: Iterable[Problem]) -> list[dict[str, str]]:
    return [{"field": p.path, "rule": p.rule} for p in problems]


def _unavailable_message(exc: QueueUnavailable, report: EnqueueReport) -> str:
    """What happened, without Redis's address (the client needs none of it)."""
    if isinstance(exc, QueueFull):
        what = "Redis is full"
    else:
        what = "Redis is away, did not answer, or did not confirm the write in time"
    rest = (
        "the others may be queued or not (unconfirmed)"
        if exc.maybe_stored
        else "the others were not queued"
    )
    if report.added:
        done = f"{len(report.added)} events were taken before it failed; {rest} (see results)"
    elif exc.maybe_stored:
        done = "the events may be queued or not (unconfirmed: see results)"
    else:
        done = "no event was queued"
    return (
        f"{what}; {done}. Send the same request again after Retry-After: events already "
        "queued are answered duplicate (the event id dedups)."
    )


def _error_body(code: str, message: str, results: list[dict[str, Any]] | None) -> bytes:
    error: dict[str, Any] = {"error": {"code": code, "message": message}}
    if results is not None:
        error["results"] = results
    return orjson.dumps(error)


def _request_headers(scope: Scope) -> tuple[str | None, str | None, str | None, str]:
    """The request's Authorization, Content-Type and Content-Length, and its content
    codings other than identity ("" if none: a gzip body was read as JSON, and answered 400
    not valid JSON, or 200 with each NDJSON line refused); Answer 400 if it has several
    Authorization or Content-Type headers (which one a server believes differs between
    servers and proxies, so neither is; the HTTP parser refuses two lengths)."""
    authorization: bytes | None = None
    ctype: bytes | None = None
    length: bytes | None = None
    codings: list[str] = []
    seen = typed = 0
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value
            seen += 1
        elif name == b"content-type":
            ctype = value
            typed += 1
        elif name == b"content-length":
            length = value
        elif name == b"content-encoding":
            for coding in value.decode("latin-1").split(","):
                if coding.strip().lower() not in ("", "identity"):
                    codings.append(coding.strip())
    if seen > 1:
        raise Answer(400, "malformed", "the request has several Authorization headers; send one")
    if typed > 1:
        raise Answer(400, "malformed", "the request has several Content-Type headers; send one")
    return _text(authorization), _text(ctype), _text(length), ", ".join(codings)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _client(scope: Scope) -> dict[str, Any]:
    client = scope.get("client")
    return {"client": f"{client[0]}:{client[1]}"} if client else {}


async def _respond(
    send: Send, status: int, body: bytes, ctype: str, headers: dict[str, str]
) -> None:
    raw_headers = [
        (b"content-type", ctype.encode()),
        (b"content-length", str(len(body)).encode()),
        *((k.encode(), v.encode()) for k, v in headers.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class AccessFormatter(JsonFormatter):
    """JSON lines; a record of :class:`AccessLines` becomes a line per request, with its
    fields (client, status, counts) as keys."""

    def format(self, record: logging.LogRecord) -> str:
        lines = getattr(record, "access_lines", None)
        if lines is None:
            return super().format(record)
        level, name = record.levelname.lower(), record.name
        return "\n".join(
            orjson.dumps(
                {
                    "ts": datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"),
                    "level": level,
                    "logger": name,
                    "message": message,
                    **fields,
                },
                default=str,
            ).decode()
            for created, message, fields in lines
        )
