"""The event queue on Redis: a stream read through a consumer group, plus a retry schedule.

Every operation that changes an event's fate is atomic with its acknowledgement (a Lua
script or MULTI/EXEC), so an event is never both acknowledged and unrecorded:

- enqueue: dedup marker ``SET NX EX`` and ``XADD`` in one script (no marker without event);
- deliver: ``XACK`` + ``XDEL`` + counter, in one script;
- retry: ``ZADD`` to the retry schedule + ``XACK`` + ``XDEL``; a script moves due retries
  back into the stream (``XADD`` + ``ZREM``);
- dead-letter: record + index + ``XACK`` + ``XDEL`` + counters (see :mod:`capi.deadletters`);
- hand back (shutdown): ``XADD`` a copy + ``XACK`` + ``XDEL`` the original;
- reclaim: ``XAUTOCLAIM`` takes over entries a crashed worker left pending.

Key names live in :mod:`capi.constants`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
import redis.exceptions

from capi.constants import CONSUMER_GROUP, RedisKeys

ENQUEUE_LUA = """
-- KEYS: stream, stats, dedup key per event. ARGV: window_s, then id, ts, json per event.
local window = tonumber(ARGV[1])
local out, added = {}, 0
for i = 3, #KEYS do
  local j = (i - 3) * 3 + 2
  local fresh = true
  if window > 0 then
    fresh = redis.call('SET', KEYS[i], '1', 'NX', 'EX', window)
  end
  if fresh then
    redis.call('XADD', KEYS[1], '*', 'e', ARGV[j + 2], 't', ARGV[j + 1], 'i', ARGV[j])
    added = added + 1
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if added > 0 then redis.call('HINCRBY', KEYS[2], 'enqueued', added) end
return out
"""

DELIVER_LUA = """
-- KEYS: stream, stats. ARGV: group, then stream ids. Ack and delete delivered entries.
-- (One script so the ids cross the wire and the client's encoder once, not twice.)
local n = #ARGV - 1
redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
redis.call('HINCRBY', KEYS[2], 'delivered', n)
redis.call('HINCRBY', KEYS[2], 'requests', 1)
return n
"""

MOVE_DUE_LUA = """
-- KEYS: retry zset, stream. ARGV: now_ms, max batches. Moves due retries into the stream.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, member in ipairs(due) do
  local batch = cjson.decode(member)
  for _, en in ipairs(batch['entries']) do
    redis.call('XADD', KEYS[2], '*', 'e', en['e'], 't', en['t'], 'i', en['i'], 'n', en['n'],
               'm', en['m'])
    moved = moved + 1
  end
  redis.call('ZREM', KEYS[1], member)
end
return moved
"""

HANDBACK_LUA = """
-- KEYS: stream. ARGV: group, then stream id per entry. Re-adds entries as new, acks originals.
for i = 2, #ARGV do
  local rows = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #rows == 1 then
    redis.call('XADD', KEYS[1], '*', unpack(rows[1][2]))
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
  end
end
return #ARGV - 1
"""


@dataclass(slots=True)
class Entry:
    """One queued event as a worker holds it: the JSON to send and its retry history."""

    stream_id: bytes
    event: bytes
    event_id: str
    timestamp_ms: int
    attempts: int = 0
    meta: dict[str, Any] | None = None

    @classmethod
    def from_fields(cls, stream_id: bytes, fields: dict[bytes, bytes]) -> Entry:
        """Build an entry from a stream entry's fields."""
        meta = fields.get(b"m")
        return cls(
            stream_id=stream_id,
            event=fields[b"e"],
            event_id=fields[b"i"].decode(),
            timestamp_ms=int(fields[b"t"]),
            attempts=int(fields.get(b"n", 0)),
            meta=orjson.loads(meta) if meta else None,
        )

    @property
    def first_attempt_ms(self) -> int | None:
        """When this event was first sent, if it has been."""
        return self.meta.get("f") if self.meta else None


class Queue:
    """capi's Redis queue for one prefix; the worker side of it."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, group: str = CONSUMER_GROUP):
        self.redis = client
        self.keys = keys
        self.group = group
        self._move_due = client.register_script(MOVE_DUE_LUA)
        self._deliver = client.register_script(DELIVER_LUA)
        self._handback = client.register_script(HANDBACK_LUA)

    async def ensure_group(self) -> None:
        """Create the stream and consumer group if missing (reading from the start)."""
        try:
            await self.redis.xgroup_create(self.keys.stream, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, consumer: str, count: int, block_ms: int | None) -> list[Entry]:
        """Read up to ``count`` new entries, waiting up to ``block_ms`` for the first."""
        resp = await self.redis.xreadgroup(
            self.group, consumer, {self.keys.stream: ">"}, count=count, block=block_ms
        )
        if not resp:
            return []
        return [Entry.from_fields(sid, f) for sid, f in resp[0][1] if f]

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[Entry]:
        """Take over entries idle for ``min_idle_ms`` in any consumer (crashed workers')."""
        resp = await self.redis.xautoclaim(
            self.keys.stream, self.group, consumer, min_idle_ms, start_id="0-0", count=count
        )
        return [Entry.from_fields(sid, f) for sid, f in resp[1] if f]

    async def deliver(self, entries: Sequence[Entry]) -> None:
        """Acknowledge delivered entries and count them."""
        await self._deliver(
            keys=[self.keys.stream, self.keys.stats],
            args=[self.group, *(e.stream_id for e in entries)],
        )

    async def schedule_retry(
        self, entries: Sequence[Entry], due_ms: int, error: dict[str, Any], now: int
    ) -> None:
        """Move entries to the retry schedule, due at ``due_ms``, atomically with the ack."""
        rows = []
        for e in entries:
            meta = dict(e.meta or {})
            meta.setdefault("f", now)
            meta.update(l=now, err=error)
            rows.append(
                {
                    "e": e.event.decode(),
                    "t": str(e.timestamp_ms),
                    "i": e.event_id,
                    "n": str(e.attempts + 1),
                    "m": orjson.dumps(meta).decode(),
                }
            )
        member = orjson.dumps({"u": uuid.uuid4().hex, "entries": rows})
        ids = [e.stream_id for e in entries]
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(self.keys.retry, {member: due_ms})
        pipe.xack(self.keys.stream, self.group, *ids)
        pipe.xdel(self.keys.stream, *ids)
        pipe.hincrby(self.keys.stats, "retried", len(ids))
        await pipe.execute()

    async def move_due_retries(self, now_ms: int, max_batches: int = 100) -> int:
        """Put retries that are due back on the stream; return how many events moved."""
        moved = await self._move_due(
            keys=[self.keys.retry, self.keys.stream], args=[now_ms, max_batches]
        )
        return int(moved)

    async def hand_back(self, entries: Sequence[Entry]) -> None:
        """Return entries to the queue as new (on shutdown), so any worker takes them at once."""
        if entries:
            await self._handback(
                keys=[self.keys.stream], args=[self.group, *(e.stream_id for e in entries)]
            )

    async def drained(self) -> bool:
        """Whether nothing is queued, in flight, or scheduled for retry."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(self.keys.stream)
        pipe.zcard(self.keys.retry)
        queued, retries = await pipe.execute()
        return int(queued) == 0 and int(retries) == 0

    async def depth(self) -> tuple[int, int, int | None, int]:
        """Queued (not yet read), in flight, oldest entry time (ms), scheduled retry batches."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(self.keys.stream)
        pipe.xrange(self.keys.stream, count=1)
        pipe.zcard(self.keys.retry)
        pipe.xpending(self.keys.stream, self.group)
        xlen, first, retries, pending = await pipe.execute(raise_on_error=False)
        # No consumer group yet (no worker has run): nothing is in flight.
        in_flight = int(pending["pending"]) if isinstance(pending, dict) else 0
        oldest = int(first[0][0].split(b"-")[0]) if first else None
        return int(xlen) - in_flight, in_flight, oldest, int(retries)

    async def heartbeat(self, consumer: str) -> None:
        """Record that this consumer is alive (for ``capi status``)."""
        await self.redis.zadd(self.keys.workers, {consumer: int(time.time() * 1000)})

    async def forget_idle_consumers(self, idle_ms: int) -> None:
        """Remove consumers that hold nothing and have been idle for ``idle_ms``."""
        try:
            consumers = await self.redis.xinfo_consumers(self.keys.stream, self.group)
        except redis.exceptions.ResponseError:
            return
        for c in consumers:
            if int(c["pending"]) == 0 and int(c["idle"]) > idle_ms:
                await self.redis.xgroup_delconsumer(self.keys.stream, self.group, c["name"])
                await self.redis.zrem(self.keys.workers, c["name"])
