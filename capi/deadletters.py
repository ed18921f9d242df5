"""Dead letters: one record per event that could not be delivered, with all it takes to
understand and replay it.

A record holds the event as it was sent (identifiers already hashed), the reason and its
guidance, the HTTP status and the API's error body, every request/trace id, the UTC times
of the first and last attempt, the number of attempts, the key's fingerprint (never the
key), the pixel id, and the replay deadline (the event's ``timestamp_ms`` + 7 days, after
which the API refuses it). Records are written in the same script as the stream
acknowledgement (one script).

A stored record that no longer reads as a :class:`DeadLetter` is :class:`Unreadable`: the
readers skip it and report it, so one bad record never breaks the others' commands.
"""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, ValidationError

from capi import dedup, queue, schema
from capi._aio import aw
from capi.constants import API_MAX_AGE_MS, RedisKeys
from capi.errors import SendError
from capi.failures import Reason
from capi.queue import Entry


def iso(ms: int | None) -> str | None:
    """Unix milliseconds as an ISO 8601 UTC timestamp with milliseconds."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


class DeadLetter(BaseModel):
    """One dead-lettered event and why.

    ``key`` is the record's key, the API's dedup key without the pixel: the event name (the
    custom event name, or the type) and the id, e.g. ``order_created:1042``. Operators may
    name a dead letter by its key or by its event ``id``.
    """

    key: str
    id: str
    destination: str = "default"
    event_type: str
    event: dict[str, Any]
    event_json: str
    reason: Reason
    meaning: str
    guidance: str
    status: int | None = None
    error_message: str = ""
    error_code: str | None = None
    error_param: str | None = None
    error_body: Any = None
    request_ids: dict[str, str] = {}
    attempts: int
    first_attempt_at: str | None = None
    last_attempt_at: str | None = None
    dead_lettered_at: str
    dead_lettered_ms: int
    key_fingerprint: str
    pixel_id: str
    timestamp_ms: int
    replay_deadline: str
    replay_deadline_ms: int
    replayable: bool

    def to_json(self) -> bytes:
        """The record as stored in Redis."""
        return self.model_dump_json().encode()

    def outline(self) -> Outline:
        """What a replay or a purge acts on of this record (Redis keeps the rest)."""
        return Outline(self.key, self.id, self.destination, self.reason, self.replay_deadline_ms)


class Outline(NamedTuple):
    """A dead letter without its event and the API's answer: what a replay or a purge acts
    on, in a small part of the record's memory (about a tenth), so that one over 200,000
    dead letters does not hold all their events."""

    key: str
    id: str
    destination: str
    reason: Reason
    replay_deadline_ms: int


def build(
    entry: Entry,
    *,
    reason: Reason,
    guidance: str,
    error: SendError | None,
    key_fingerprint: str,
    pixel_id: str,
    now_ms: int,
    attempted: bool,
    destination: str = "default",
) -> DeadLetter:
    """The dead letter record of one entry; ``attempted`` if this failure was a send."""
    event = orjson.loads(entry.event)
    resp = error.response if error else None
    first = entry.first_attempt_ms or (now_ms if attempted else None)
    last = now_ms if attempted else (entry.meta or {}).get("l")
    deadline = entry.timestamp_ms + API_MAX_AGE_MS
    return DeadLetter(
        key=dedup.event_key(event, entry.event_id),
        id=entry.event_id,
        destination=destination,
        event_type=str(event.get("custom_event_name") or event.get("type")),
        event=event,
        event_json=entry.event.decode(),
        reason=reason,
        meaning=reason.meaning,
        guidance=guidance,
        status=resp.status if resp else None,
        error_message=resp.message if resp else "",
        error_code=resp.code if resp else None,
        error_param=resp.param if resp else None,
        error_body=resp.body if resp else None,
        request_ids=resp.request_ids if resp else {},
        attempts=entry.attempts + (1 if attempted else 0),
        first_attempt_at=iso(first),
        last_attempt_at=iso(last),
        dead_lettered_at=iso(now_ms) or "",
        dead_lettered_ms=now_ms,
        key_fingerprint=key_fingerprint,
        pixel_id=pixel_id,
        timestamp_ms=entry.timestamp_ms,
        replay_deadline=iso(deadline) or "",
        replay_deadline_ms=deadline,
        replayable=reason.replayable and deadline > now_ms,
    )


async def write(
    client: aioredis.Redis,
    keys: RedisKeys,
    group: str,
    entries: Sequence[Entry],
    records: Sequence[DeadLetter],
    *,
    dedup_window_s: int,
) -> None:
    """Store records and acknowledge their stream entries, in one script
    (:func:`capi.queue.dead_letter`); forget the events' dedup digests, so that a corrected
    event may be enqueued under the same id."""
    rows = [(r.key, r.to_json(), r.dead_lettered_ms, r.reason.value) for r in records]
    await queue.dead_letter(client, keys, group, entries, rows, dedup_window_s=dedup_window_s)


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A stored record that cannot be read as a :class:`DeadLetter` (written by an older or
    broken version, say): skipped by every command that reads records, and kept as stored
    so ``capi dead-letters show KEY`` can print it and ``purge KEY`` can remove it."""

    key: str
    why: str
    raw: bytes
    destination: str = "default"

    @property
    def id(self) -> str:
        """The event id part of the key (``name:id``)."""
        return self.key.partition(":")[2]


def parse(key: bytes | str, raw: bytes | str) -> DeadLetter | Unreadable:
    """A stored record as a DeadLetter, or as Unreadable with the reason (never the data)."""
    name = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    raw = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    try:
        return DeadLetter.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        return Unreadable(name, f"{where + ': ' if where else ''}{first['msg']}"[:200], raw)
    except (ValueError, RecursionError) as exc:
        return Unreadable(name, type(exc).__name__, raw)


def _sorted(
    pairs: Sequence[tuple[bytes | str, bytes | str | None]], unreadable: list[Unreadable] | None
) -> list[DeadLetter]:
    records = []
    for key, raw in pairs:
        if raw is None:
            continue
        parsed = parse(key, raw)
        if isinstance(parsed, DeadLetter):
            records.append(parsed)
        elif unreadable is not None and all(u.key != parsed.key for u in unreadable):
            unreadable.append(parsed)
    return records


async def find(
    client: aioredis.Redis, keys: RedisKeys, ref: str, unreadable: list[Unreadable] | None = None
) -> list[DeadLetter]:
    """The dead letters named by ``ref``: a record key (``name:id``), or an event id.

    Records that cannot be read are skipped, and added to ``unreadable`` if given.
    """
    raw = await aw(client.hget(keys.deadletters, ref))
    if raw:
        return _sorted([(ref, raw)], unreadable)
    # Keys are ``name:id``: scan the index for names ending in ``:ref`` (a slice at a
    # time), never read every record.
    names: list[bytes] = []
    async for name, _ in client.zscan_iter(
        keys.deadletter_index, match=f"*:{_glob_escaped(ref)}", count=10_000
    ):
        names.append(name)
    if not names:
        return []
    raws = await aw(client.hmget(keys.deadletters, names))
    return [r for r in _sorted(list(zip(names, raws, strict=True)), unreadable) if r.id == ref]


async def scan(
    client: aioredis.Redis,
    sources: Sequence[tuple[str, RedisKeys]],
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    unreadable: list[Unreadable] | None = None,
    chunk: int = 200,
) -> AsyncIterator[DeadLetter]:
    """The dead letters of several destinations (each ``(name, keys)``), newest first over
    all of them, with ``destination`` set to the name they are stored under, read a slice
    at a time: only the index names of ``chunk`` entries per destination and one batch of
    records are held at once, never every record (``capi dead-letters`` over 200,000 dead
    letters). Unreadable records are skipped, and added to ``unreadable`` if given.

    It pages by position in each time index: a record added or removed meanwhile may be
    passed over or read twice at a slice's edge. Replay and purge act on the
    records' keys, and skip a record already gone."""
    low = "-inf" if since_ms is None else since_ms
    high = "+inf" if until_ms is None else until_ms
    done: list[int] = [0] * len(sources)
    heads: list[tuple[float, int, bytes]] = []  # ties: the destinations' order

    async def slice_of(i: int) -> list[tuple[bytes, float]]:
        rows = await client.zrevrangebyscore(
            sources[i][1].deadletter_index, high, low, start=done[i], num=chunk, withscores=True
        )
        done[i] += len(rows)
        return list(rows)

    pending = await _first_slices(client, sources, high, low, chunk)
    for i, rows in enumerate(pending):
        done[i] = len(rows)
        if rows:
            name, score = rows.pop()
            heads.append((-score, i, name))
    heapq.heapify(heads)
    while heads:
        batch: list[tuple[int, bytes]] = []
        while heads and len(batch) < chunk:
            _, i, name = heapq.heappop(heads)
            batch.append((i, name))
            if not pending[i] and done[i] % chunk == 0 and done[i]:
                pending[i] = list(reversed(await slice_of(i)))
            if pending[i]:
                nxt, score = pending[i].pop()
                heapq.heappush(heads, (-score, i, nxt))
        found = await _records(client, sources, batch)
        for i, name in batch:
            raw = found[(i, name)]
            if raw is None:  # replayed or purged since the index was read
                continue
            parsed = parse(name, raw)
            if isinstance(parsed, DeadLetter):
                parsed.destination = sources[i][0]  # where it is stored is where it goes
                yield parsed
            elif unreadable is not None:
                unreadable.append(replace(parsed, destination=sources[i][0]))


async def _first_slices(
    client: aioredis.Redis,
    sources: Sequence[tuple[str, RedisKeys]],
    high: float | str,
    low: float | str,
    chunk: int,
) -> list[list[tuple[bytes, float]]]:
    """Each destination's newest ``chunk`` index entries, oldest first (popped from the
    end), 100 destinations a round trip."""
    slices: list[list[tuple[bytes, float]]] = []
    for first in range(0, len(sources), 100):
        pipe = client.pipeline(transaction=False)
        for _, keys in sources[first : first + 100]:
            pipe.zrevrangebyscore(
                keys.deadletter_index, high, low, start=0, num=chunk, withscores=True
            )
        slices += [list(reversed(rows)) for rows in await pipe.execute()]
    return slices


async def _records(
    client: aioredis.Redis, sources: Sequence[tuple[str, RedisKeys]], batch: list[tuple[int, bytes]]
) -> dict[tuple[int, bytes], bytes | None]:
    """The stored records of a batch of (source, name), one HMGET per destination in one
    round trip."""
    wanted: dict[int, list[bytes]] = {}
    for i, name in batch:
        wanted.setdefault(i, []).append(name)
    pipe = client.pipeline(transaction=False)
    for i, names in wanted.items():
        pipe.hmget(sources[i][1].deadletters, names)
    found: dict[tuple[int, bytes], bytes | None] = {}
    for (i, names), raws in zip(wanted.items(), await pipe.execute(), strict=True):
        found.update({(i, n): r for n, r in zip(names, raws, strict=True)})
    return found


@dataclass(frozen=True, slots=True)
class Page:
    """One page of dead letters, newest first, as :func:`page` read it."""

    records: list[DeadLetter]
    unreadable: list[Unreadable]
    total: int  # dead letters in the time range, before any reason filter
    next_at: int | None  # where the next page starts (None: this is the last)


async def page(
    client: aioredis.Redis,
    keys: RedisKeys,
    *,
    at: int = 0,
    limit: int = 50,
    since_ms: int | None = None,
    until_ms: int | None = None,
    reasons: Sequence[str] = (),
    chunk: int = 500,
) -> Page:
    """A page of at most ``limit`` dead letters, newest first, read through the time index
    (``{d}:dl:index``) a slice at a time, never all of them: ``at`` is the position in the
    time range where the page starts; with ``reasons``, slices of ``chunk`` are read until
    the page is full or the range ends."""
    low = "-inf" if since_ms is None else since_ms
    high = "+inf" if until_ms is None else until_ms
    total = int(await client.zcount(keys.deadletter_index, low, high))
    records: list[DeadLetter] = []
    unreadable: list[Unreadable] = []
    position = max(0, at)
    while len(records) < limit and position < total:
        want = chunk if reasons else limit - len(records)
        ids = await client.zrevrangebyscore(
            keys.deadletter_index, high, low, start=position, num=want
        )
        if not ids:
            break
        raws = await aw(client.hmget(keys.deadletters, ids))
        for name, raw in zip(ids, raws, strict=True):
            position += 1
            if raw is None:
                continue
            parsed = parse(name, raw)
            if isinstance(parsed, Unreadable):
                unreadable.append(parsed)
            elif not reasons or parsed.reason.value in reasons:
                records.append(parsed)
                if len(records) == limit:
                    break
    return Page(records, unreadable, total, position if position < total else None)


async def previous_at(
    client: aioredis.Redis,
    keys: RedisKeys,
    at: int,
    *,
    limit: int = 50,
    since_ms: int | None = None,
    until_ms: int | None = None,
    reasons: Sequence[str] = (),
    chunk: int = 500,
) -> int:
    """Where the page before the one at ``at`` starts (``0`` at the latest): walking back
    from ``at`` through the time index a slice at a time until ``limit`` records with one
    of ``reasons`` (any, when empty) were passed."""
    if not reasons:
        return max(0, at - limit)
    low = "-inf" if since_ms is None else since_ms
    high = "+inf" if until_ms is None else until_ms
    end, seen = max(0, at), 0
    while end > 0:
        start = max(0, end - chunk)
        ids = await client.zrevrangebyscore(
            keys.deadletter_index, high, low, start=start, num=end - start
        )
        raws = await aw(client.hmget(keys.deadletters, ids)) if ids else []
        for offset in range(len(ids) - 1, -1, -1):
            raw = raws[offset]
            parsed = parse(ids[offset], raw) if raw is not None else None
            if isinstance(parsed, DeadLetter) and parsed.reason.value in reasons:
                seen += 1
                if seen == limit:
                    return start + offset
        end = start
    return 0


def _glob_escaped(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def find_by_id(
    client: aioredis.Redis,
    keys: RedisKeys,
    ref: str,
    *,
    limit: int = 100,
    newest: int | None = None,
) -> list[DeadLetter | Unreadable]:
    """The dead letters named by ``ref`` (a record key ``name:id`` or an event id), at most
    ``limit``: the record key itself, else the id under each standard event name (one
    HMGET), else, for a custom event's name, a scan of the index's names (never a read of
    every record); with ``newest``, only the names of the newest ``newest`` entries."""
    raw = await aw(client.hget(keys.deadletters, ref))
    if raw:
        return [parse(ref, raw)]
    standard = [f"{name}:{ref}" for name in schema.STANDARD_TYPES]
    raws = await aw(client.hmget(keys.deadletters, standard))
    hits = [parse(k, r) for k, r in zip(standard, raws, strict=True) if r is not None]
    if hits:
        return hits[:limit]
    found: list[bytes] = []
    if newest is not None:
        names = await aw(client.zrevrange(keys.deadletter_index, 0, newest - 1))
        found = [n for n in names if n.endswith(b":" + ref.encode())][:limit]
    else:
        async for name, _ in client.zscan_iter(
            keys.deadletter_index, match=f"*:{_glob_escaped(ref)}", count=10_000
        ):
            found.append(name)
            if len(found) >= limit:
                break
    if not found:
        return []
    raws = await aw(client.hmget(keys.deadletters, found))
    return [parse(k, r) for k, r in zip(found, raws, strict=True) if r is not None]
