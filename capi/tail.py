"""Live outcomes: a bounded, PII-free ring of each destination's most recent outcomes.

What ``capi tail`` reads. Every outcome an operator asks about is written here by the
module that owns it: delivered, validated (a ``validate_only`` destination), retrying,
dead-lettered and held by the worker's :mod:`capi.worker.fates`; refused and skipped by the
producer (so the intake and ``capi enqueue`` too).

Redis layout (see :mod:`capi.constants`)::

    {d}:tail   STREAM  one entry per outcome of up to CHUNK events; fields:
                       s = status, v = JSON [[id, type, [kind, ...], timestamp_ms], ...],
                       and where they apply r = request id, x = reason or rule,
                       l = latency (ms), a = next attempt (Unix ms)

The stream is trimmed with ``MAXLEN ~ CAPI_TAIL_ENTRIES`` (200 by default; 0 turns the
ring off), so it holds at most about ``(entries + 100) * CHUNK`` outcomes per destination
(Redis trims whole nodes of 100 entries): 30,000 outcomes, ~1.5 MB at ~50 bytes each, for a
destination busy with full batches; a destination sending one event at a time keeps its
last ~300. An entry never holds a value or a hash of an identifier: event ids, types,
identifier kind names (:mod:`capi.kinds`), reasons and request ids only.

One write per batch, pipelined: the ring costs the worker well under a microsecond of
Redis time per event (``python -m tests.benchmarks.bench --only tail`` prints the drain rate
with the ring on and off).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as aioredis
import redis.exceptions
from redis import Redis

from capi.redisconn import is_cluster
from capi.trouble import classify

CHUNK = 100
STATUSES = (
    "delivered",
    "validated",
    "retrying",
    "dead_lettered",
    "held",
    "refused",
    "skipped",
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of some events, as one ring entry says it."""

    status: str
    # (id, type, identifier kinds, the event's timestamp_ms or 0 when unknown)
    events: Sequence[tuple[str, str, Sequence[str], int]]
    request_id: str | None = None
    reason: str | None = None
    latency_ms: float | None = None
    next_attempt_ms: int | None = None

    def fields(self) -> list[dict[Field, Field]]:
        """The stream entries' fields, one per chunk of at most :data:`CHUNK` events."""
        common: dict[Field, Field] = {"s": self.status}
        if self.request_id:
            common["r"] = self.request_id
        if self.reason:
            common["x"] = self.reason
        if self.latency_ms is not None:
            common["l"] = round(self.latency_ms, 1)
        if self.next_attempt_ms is not None:
            common["a"] = self.next_attempt_ms
        return [
            {**common, "v": orjson.dumps([list(e) for e in self.events[i : i + CHUNK]])}
            for i in range(0, len(self.events), CHUNK)
        ]


Field = bytes | bytearray | memoryview | str | int | float  # what redis-py takes
Write = tuple[str, dict[Field, Field]]  # one XADD: the ring's key and the entry's fields


def writes(key: str, outcome: Outcome, entries: int) -> list[Write]:
    """The entries that put ``outcome`` in the ring ``key`` (none when the ring is off)."""
    if entries <= 0 or not outcome.events:
        return []
    return [(key, f) for f in outcome.fields()]


async def append(redis: aioredis.Redis, found: Sequence[Write], entries: int) -> None:
    """Add entries to rings, trimming each to about ``entries``, in one round trip."""
    if found:
        async with redis.pipeline(transaction=False) as pipe:
            for key, fields in found:
                pipe.xadd(key, fields, maxlen=entries, approximate=True)
            await pipe.execute()


def append_sync(redis: Redis, found: Sequence[Write], entries: int) -> None:
    """:func:`append` for a synchronous client."""
    if found:
        with redis.pipeline(transaction=False) as pipe:
            for key, fields in found:
                pipe.xadd(key, fields, maxlen=entries, approximate=True)
            pipe.execute()


@dataclass(frozen=True, slots=True)
class Line:
    """One event's outcome, as ``capi tail`` prints it."""

    time_ms: int
    destination: str
    id: str
    type: str
    status: str
    identifiers: list[str]
    timestamp_ms: int = 0  # the event's own time (0 when unknown)
    request_id: str | None = None
    reason: str | None = None
    latency_ms: float | None = None
    next_attempt_ms: int | None = None
    stream_id: str = field(default="", compare=False)

    def json(self) -> dict[str, Any]:
        """The JSON object of ``capi tail --json``."""
        out: dict[str, Any] = {
            "time": iso(self.time_ms),
            "destination": self.destination,
            "id": self.id,
            "type": self.type,
            "status": self.status,
            "identifiers": self.identifiers,
        }
        if self.request_id:
            out["request_id"] = self.request_id
        if self.reason:
            out["reason"] = self.reason
        if self.latency_ms is not None:
            out["latency_ms"] = self.latency_ms
        if self.next_attempt_ms is not None:
            out["next_attempt"] = iso(self.next_attempt_ms)
        return out


def lines(destination: str, stream_id: bytes, fields: dict[bytes, bytes]) -> list[Line]:
    """The lines of one ring entry (an unreadable entry gives none)."""
    try:
        rows = orjson.loads(fields[b"v"])
        status = fields[b"s"].decode()
        latency = float(fields[b"l"]) if b"l" in fields else None
        next_attempt = int(fields[b"a"]) if b"a" in fields else None
        time_ms = int(stream_id.split(b"-", 1)[0])
        return [
            Line(
                time_ms=time_ms,
                destination=destination,
                id=str(i),
                type=str(t),
                status=status,
                identifiers=[str(k) for k in found],
                timestamp_ms=int(ts),
                request_id=_text(fields.get(b"r")),
                reason=_text(fields.get(b"x")),
                latency_ms=latency,
                next_attempt_ms=next_attempt,
                stream_id=stream_id.decode(),
            )
            for i, t, found, ts in rows
        ]
    except (KeyError, ValueError, TypeError, orjson.JSONDecodeError):
        return []


def matching(
    found: Iterable[Line], statuses: Sequence[str] = (), ids: Sequence[str] = ()
) -> list[Line]:
    """The lines with one of ``statuses`` and one of ``ids`` (each: any, when empty)."""
    return [
        line
        for line in found
        if (not statuses or line.status in statuses) and (not ids or line.id in ids)
    ]


_TYPE = b'"type":"'
_CUSTOM = b'"custom_event_name":"'


def name_of_json(event_json: bytes) -> str:
    """An event's name (``custom_event_name`` for a custom event, else its ``type``), read
    from the JSON capi sends without parsing it: capi writes ``type`` before ``data`` and
    these values are plain names (no escapes), and a ``"type":"`` inside a string value
    would have its quotes escaped."""
    for key in (_CUSTOM, _TYPE):
        start = event_json.find(key)
        if start >= 0:
            start += len(key)
            end = event_json.find(b'"', start)
            if end > start:
                return event_json[start:end].decode(errors="replace")
    return "?"


def iso(ms: int) -> str:
    """Unix milliseconds as an ISO 8601 UTC time with milliseconds."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def _poll(redis: aioredis.Redis, last: dict[str, str], block_ms: int) -> list[Any]:
    """On a Redis Cluster, where one XREAD may not name rings of several slots: each ring
    read on its own (one pipelined round trip per shard), and when none had anything new,
    a pause of a fifth of ``block_ms`` before the next look."""
    pipe = redis.pipeline(transaction=False)
    for key, after in last.items():
        pipe.xread({key: after})
    answer = [found for rows in await pipe.execute() for found in rows or []]
    if not answer:
        await asyncio.sleep(block_ms / 5000)
    return answer


def _text(value: bytes | None) -> str | None:
    return value.decode(errors="replace") if value else None


async def recent(
    redis: aioredis.Redis,
    rings: dict[str, str],
    count: int,
    *,
    whole: bool = False,
    statuses: Sequence[str] = (),
    ids: Sequence[str] = (),
) -> tuple[list[Line], dict[str, str]]:
    """The last ``count`` outcomes across ``rings`` (destination -> ring key) with one of
    ``statuses`` and ``ids`` (each: any, when empty; see :func:`matching`), newest last;
    every outcome when ``count`` is 0 (``whole`` reads each ring entirely, for filters that
    may skip most lines); and each ring's newest entry id, from which :func:`follow` goes
    on without a gap. Only the newest ``count`` lines are kept from one ring to the next:
    ``capi tail -n 1000`` over 1,000 rings holds a thousand lines and one ring's, not every
    ring's."""
    found: list[Line] = []
    newest: dict[str, str] = {}
    for destination, key in rings.items():
        rows = await redis.xrevrange(key, count=None if whole else max(1, count))
        newest[key] = rows[0][0].decode() if rows else "0-0"
        for stream_id, fields in rows:
            found.extend(matching(lines(destination, stream_id, fields), statuses, ids))
        if count > 0 and len(found) > count:
            found.sort(key=lambda line: (line.time_ms, line.stream_id))
            del found[:-count]
    found.sort(key=lambda line: (line.time_ms, line.stream_id))
    return found, newest


# How long a follow block-reads a ring (on a cluster: a fifth of it between polls).
FOLLOW_BLOCK_MS = 1000
# Between tries while Redis is away.
AWAY_RETRY_S = 1.0
# Troubles a failover, a restart or a frozen server cause, which pass by themselves: a
# follow rides them out. Others (a wrong password, a missing permission) end it.
PASSING = frozenset(
    {"unreachable", "read-only", "loading", "busy", "master-down", "unblocked"}
    | {"cluster-down", "cluster-moved"}
)


async def follow(
    client: aioredis.Redis,
    rings: dict[str, str],
    after: dict[str, str],
    block_ms: int = FOLLOW_BLOCK_MS,
    away: Callable[[BaseException | None], None] | None = None,
) -> AsyncIterator[list[Line]]:
    """The outcomes written after ``after`` (ring key -> entry id), as they are written:
    the lines of each read, oldest first, for ever.

    Redis going away for a while (a failover, a restart: :data:`PASSING`) does not end it:
    ``away`` is told the error when a read first fails, and ``None`` when one succeeds
    again; reads go on from the last entry seen. ``client``'s calls must be allowed to
    take longer than ``block_ms`` (:func:`follow_timeout_s`)."""
    by_key = {key: destination for destination, key in rings.items()}
    last = dict(after)
    failing = False
    while True:
        try:
            if is_cluster(client):
                answer = await _poll(client, last, block_ms)
            else:
                answer = await client.xread(dict(last), block=block_ms)  # type: ignore[arg-type]
        except redis.exceptions.RedisError as exc:
            if classify(exc)[0] not in PASSING:
                raise
            if not failing and away is not None:
                away(exc)
            failing = True
            await asyncio.sleep(AWAY_RETRY_S)
            continue
        if failing and away is not None:
            away(None)
        failing = False
        batch: list[Line] = []
        for key, rows in answer or []:
            name = key.decode() if isinstance(key, bytes) else key
            for stream_id, fields in rows:
                last[name] = stream_id.decode()
                batch.extend(lines(by_key[name], stream_id, fields))
        batch.sort(key=lambda line: (line.time_ms, line.stream_id))
        yield batch


def follow_timeout_s(redis_timeout_s: float) -> float:
    """The socket timeout of a client that follows: ``CAPI_REDIS_TIMEOUT_S`` on top of the
    block (with the block alone, a quiet second timed out a follow under a 1 s timeout)."""
    return redis_timeout_s + FOLLOW_BLOCK_MS / 1000
