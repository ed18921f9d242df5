"""The event queue on Redis: a stream read through a consumer group, plus a retry schedule.

Every operation that changes an event's fate is one Lua script, atomic with its
acknowledgement, so an event is never both acknowledged and unrecorded; and each acts only
on entries still pending, so running it twice (after a lost answer) changes nothing:

- enqueue: dedup record (:mod:`capi.dedup`) and ``XADD`` in one script (no record without
  event);
- deliver: ``XACK`` + ``XDEL`` + counters (with match coverage);
- retry: ``XACK`` + ``ZADD`` to the retry schedule + ``XDEL``; a script moves due retries
  back into the stream (``XADD`` + ``ZREM``);
- dead-letter: ``XACK`` + record + index + ``XDEL`` + counters (the records themselves are
  :mod:`capi.deadletters`'s);
- replay: a dead letter's event back on the stream + the record removed;
- hand back (shutdown): ``XACK`` + ``XADD`` a copy (that keeps its first enqueue time) +
  ``XDEL`` the original;
- lease: a live worker renews its hold on entries in flight (``XCLAIM`` to itself);
- purge (``capi queue purge``): ``XDEL`` of entries not in flight, ``ZREM`` of scheduled
  retries, their dedup digests forgotten;
- reclaim: entries pending in a worker with no heartbeat, or this worker's own whose read
  answer was lost, are taken over (``XCLAIM``).

This module holds every script that writes to an event stream (the producers run its
enqueue script); key names live in :mod:`capi.constants`. On a Redis Cluster each script
runs in its single-slot form, and :mod:`capi.index` writes the shared index after it.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from capi import coverage, dedup, index
from capi._aio import aw
from capi.constants import CONSUMER_GROUP, RedisKeys

# The dedup record's Lua (see capi.dedup) needs its prefix, bucket length and Redis's clock.
DEDUP_HEADER = (
    "local dd_prefix, dd_bucket_s = ARGV[1], tonumber(ARGV[2])\n"
    "local dd_now = tonumber(redis.call('TIME')[1])\n" + dedup.LUA_FUNCTIONS
)

# Every script that writes to a stream marks its destination active (and wakes idle
# workers when it was not): see RedisKeys.active. The read that finds a stream empty
# unmarks it, atomically, so a destination with unread entries is never left unmarked.
# The retry-due index follows each retry schedule's earliest entry. On a cluster these
# functions are swapped for single-slot twins (capi.index.for_cluster).
_ACTIVATE = index.ACTIVATE
_INDEX_RETRIES = index.INDEX_RETRIES
_REPLY = index.REPLY

ENQUEUE_LUA = (
    DEDUP_HEADER
    + _ACTIVATE
    + _REPLY
    + """
-- KEYS: stream, stats, active, wake. ARGV: dedup prefix, bucket_s, window_s, destination,
-- events skipped (consent denied: counted, never stored), then per event: digest, id,
-- timestamp_ms, JSON, identifier kinds (capi.coverage mask). Queues each event unless its
-- digest is in the window. A duplicate is counted: that write lets a WAIT / WAITAOF sent
-- after this script cover the earlier write of the same event (see capi.durability).
-- The first XADD comes before any other write (a dedup record, a counter): when Redis
-- refuses it (a stream key holding another type) the call fails having written nothing,
-- so the same events sent again are queued, not answered duplicate, and no skip is counted.
local window = tonumber(ARGV[3])
local out, added = {}, 0
for j = 6, #ARGV, 5 do
  local d = ARGV[j]
  if window > 0 and dd_seen(d) then
    out[#out + 1] = 0
  else
    redis.call('XADD', KEYS[1], '*', 'e', ARGV[j + 3], 't', ARGV[j + 2], 'i', ARGV[j + 1],
               'k', ARGV[j + 4])
    if window > 0 then dd_add(d) end
    added = added + 1
    out[#out + 1] = 1
  end
end
if tonumber(ARGV[5]) > 0 then redis.call('HINCRBY', KEYS[2], 'skipped', ARGV[5]) end
if added > 0 then
  redis.call('HINCRBY', KEYS[2], 'enqueued', added)
  activate(KEYS[3], KEYS[4], ARGV[4])
end
if added < #out then
  redis.call('HINCRBY', KEYS[2], 'duplicates', #out - added)
end
return reply(out)
"""
)


_HEAD, _PER_EVENT = 5, 5  # ENQUEUE_LUA's arguments: five, then five per event
_DESTINATION, _SKIPPED = 3, 4  # of the first five


def call_destination(args: Sequence[Any]) -> str:
    """The destination of an :func:`enqueue_call`'s arguments."""
    return str(args[_DESTINATION])


def call_skipped(args: Sequence[Any]) -> int:
    """The events an :func:`enqueue_call` counts as skipped (consent denied)."""
    return int(args[_SKIPPED])


def enqueue_call(
    keys: RedisKeys,
    dedup_window_s: int,
    events: Iterable[tuple[bytes, str, int, bytes | str, int]],
    skipped: int = 0,
) -> tuple[list[str], list[Any]]:
    """The keys and arguments of :data:`ENQUEUE_LUA` for events prepared for one
    destination, each given as (dedup digest, id, timestamp_ms, JSON, identifier kinds
    mask), and the number of events skipped for it (consent denied under ``drop``)."""
    names, head = _enqueue_head(keys, dedup_window_s)
    args: list[Any] = [*head, skipped]
    for event in events:
        args += event
    return list(names), args


@functools.lru_cache(maxsize=1024)
def _enqueue_head(keys: RedisKeys, dedup_window_s: int) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """:data:`ENQUEUE_LUA`'s keys and first arguments for a destination (the same for each
    of its calls, so worked out once)."""
    active, wake, _ = index.script_keys(keys)
    head = (keys.dedup_prefix, dedup.bucket_s(dedup_window_s), dedup_window_s, keys.destination)
    return (keys.stream, keys.stats, active, wake), head


def merged_enqueue_calls(
    calls: Sequence[tuple[list[str], list[Any]]],
) -> tuple[list[tuple[list[str], list[Any]]], list[tuple[int, int, int]]]:
    """Calls of :data:`ENQUEUE_LUA` (from :func:`enqueue_call`) as few calls: those to the
    same keys with the same dedup prefix, window and destination become one, their events
    in order and their skipped counts added up. Also, for each call given, where its
    per-event answers are: the merged call's index, then the slice of its per-event flags
    (on a cluster, of the flags :func:`capi.index.unpack` takes out of the answer)."""
    out: list[tuple[list[str], list[Any]]] = []
    where: dict[tuple[Any, ...], int] = {}
    spans = []
    for keys, args in calls:
        head = (*keys, *args[:_SKIPPED])
        m = where.get(head)
        if m is None:
            m = where[head] = len(out)
            out.append((keys, [*args[:_SKIPPED], 0]))
        merged = out[m][1]
        merged[_SKIPPED] += args[_SKIPPED]
        start = (len(merged) - _HEAD) // _PER_EVENT
        merged += args[_HEAD:]
        spans.append((m, start, start + (len(args) - _HEAD) // _PER_EVENT))
    return out, spans


def lua(keys: RedisKeys, script: str) -> str:
    """A script of this module as it runs where ``keys`` live (one Redis, or a cluster:
    see :func:`capi.index.for_cluster`)."""
    return index.for_cluster(script) if keys.cluster else script


READ_LUA = (
    "#!lua flags=allow-oom\n"
    + _ACTIVATE
    + _REPLY
    + """
-- KEYS: stream, active. ARGV: group, consumer, count, destination.
-- Read new entries; none left: the destination is no longer active. allow-oom: reading is
-- how a full Redis is drained.
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                     'STREAMS', KEYS[1], '>')
if not r or #r[1][2] == 0 then
  deactivate(KEYS[2], ARGV[4])
  return reply({})
end
return reply(r[1][2])
"""
)

# Scripts that record a fate carry the allow-oom flag: each removes an entry from the
# stream, so a full Redis (maxmemory under noeviction) must still run them: delivering is
# the only thing that frees its memory. Each is idempotent (it acts only on entries still
# pending), so a worker that lost its answer to a timeout may simply run it again.

DELIVER_LUA = """#!lua flags=allow-oom
-- KEYS: stream, stats, endpoint, coverage hour. ARGV: group, now_ms, counter ('delivered',
-- or 'validated' in test mode), coverage counts (JSON object, see capi.coverage; '' in
-- test mode), coverage TTL (s), then stream ids.
-- Ack and delete delivered entries; count them and the identifier kinds they carried
-- (only if this call acknowledged them: a repeat counts nothing); clear the endpoint's
-- failing mark, returning it.
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 6))
redis.call('XDEL', KEYS[1], unpack(ARGV, 6))
if n > 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], n)
  redis.call('HINCRBY', KEYS[2], 'requests', 1)
  if ARGV[4] ~= '' then
    for kind, count in pairs(cjson.decode(ARGV[4])) do
      redis.call('HINCRBY', KEYS[4], kind, count)
    end
    redis.call('EXPIRE', KEYS[4], ARGV[5])
  end
end
local since = redis.call('HGET', KEYS[3], 'failing_since')
redis.call('HDEL', KEYS[3], 'failing_since')
redis.call('HSET', KEYS[3], 'last_ok_ms', ARGV[2])
return {n, since or ''}
"""

ENDPOINT_OK_LUA = """#!lua flags=allow-oom
-- KEYS: endpoint. ARGV: now_ms. The endpoint answers: no longer failing. Returns since when
-- it was failing (ms), or ''.
local since = redis.call('HGET', KEYS[1], 'failing_since')
redis.call('HDEL', KEYS[1], 'failing_since')
redis.call('HSET', KEYS[1], 'last_ok_ms', ARGV[1])
return since or ''
"""

RETRY_LUA = (
    "#!lua flags=allow-oom\n"
    + _INDEX_RETRIES
    + _REPLY
    + """
-- KEYS: stream, retry zset, stats, endpoint, retry-due index. ARGV: group, due_ms, member,
-- now_ms, endpoint error ('' unless the endpoint itself failed), destination, then stream
-- ids. Move pending entries to the retry schedule (the member holds their copies).
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 7))
if n > 0 then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  redis.call('HINCRBY', KEYS[3], 'retried', n)
  index_retries(KEYS[2], KEYS[5], ARGV[6])
end
redis.call('XDEL', KEYS[1], unpack(ARGV, 7))
if ARGV[5] ~= '' then
  redis.call('HSETNX', KEYS[4], 'failing_since', ARGV[4])
  redis.call('HSET', KEYS[4], 'last_error', ARGV[5], 'last_error_ms', ARGV[4])
end
return reply(n)
"""
)

# Shared by the two scripts that move scheduled retries back: one retry member, whose
# entries go back on the stream and which leaves the schedule. Returns the events moved.
# KEYS: retry zset, stream, active, wake, retry-due index; ARGV[3]: the destination.
_REQUEUE_MEMBER = (
    _ACTIVATE
    + _INDEX_RETRIES
    + _REPLY
    + """
local function requeue(member)
  local n = 0
  for _, en in ipairs(cjson.decode(member)['entries']) do
    local fields = {'e', en['e'], 't', en['t'], 'i', en['i'], 'n', en['n'], 'm', en['m']}
    if en['k'] then
      fields[#fields + 1] = 'k'
      fields[#fields + 1] = en['k']
    end
    redis.call('XADD', KEYS[2], '*', unpack(fields))
    n = n + 1
  end
  redis.call('ZREM', KEYS[1], member)
  return n
end
local function requeued(moved)
  index_retries(KEYS[1], KEYS[5], ARGV[3])
  if moved > 0 then activate(KEYS[3], KEYS[4], ARGV[3]) end
end
"""
)

MOVE_DUE_LUA = (
    "#!lua flags=allow-oom\n"
    + _REQUEUE_MEMBER
    + """
-- ARGV: due by (ms), max batches, destination. Moves due retries to the stream.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, member in ipairs(due) do moved = moved + requeue(member) end
requeued(moved)
return reply(moved)
"""
)

RELEASE_LUA = (
    "#!lua flags=allow-oom\n"
    + _REQUEUE_MEMBER
    + """
-- ARGV: how many at the front to skip, max batches, destination.
-- After an outage: move scheduled retries to the stream now, except those whose wait the
-- server asked for (Retry-After), which stay until due. Returns moved events, skipped.
local skipped = tonumber(ARGV[1])
local rows = redis.call('ZRANGE', KEYS[1], skipped, skipped + tonumber(ARGV[2]) - 1)
local moved = 0
for _, member in ipairs(rows) do
  if cjson.decode(member)['ra'] then
    skipped = skipped + 1
  else
    moved = moved + requeue(member)
  end
end
requeued(moved)
return reply({moved, skipped, #rows})
"""
)

FIRST_ENQUEUED_LUA = """
-- The first enqueue time (ms) of a stream's first entry, or false when it is empty: its id's
-- time, or, for an entry queued again (a retry come due, a hand-back), the time its meta
-- field m keeps as "q". Entries queued again after others are not looked at: the age is
-- the first entry's (the one read next).
local function first_enqueued(stream)
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #first == 0 then return false end
  local t = tonumber(string.match(first[1][1], '^(%d+)'))
  local fields = first[1][2]
  for j = 1, #fields, 2 do
    if fields[j] == 'm' then
      local q = tonumber(string.match(fields[j + 1], '"q":(%d+)'))
      if q and q < t then t = q end
    end
  end
  return t
end
"""

DEPTH_LUA = (
    "#!lua flags=no-writes,allow-oom\n"
    + FIRST_ENQUEUED_LUA
    + """
-- KEYS: stream, retry zset. ARGV: the consumer group. One snapshot (a script runs alone, so
-- no retry moves back to the stream between two of these reads): {XLEN, entries pending in
-- the group, the earliest enqueue time (ms) of the events not yet delivered or -1, ZCARD}.
-- Each retry member begins {"u":"<hex>","q":<ms>: read without decoding the events.
local xlen = redis.call('XLEN', KEYS[1])
local pending = 0
local ok, summary = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1])
if ok then pending = summary[1] end  -- no group yet (no worker has run): none in flight
local oldest = first_enqueued(KEYS[1])
local retries = redis.call('ZCARD', KEYS[2])
if retries > 0 then
  for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    local q = tonumber(string.match(member, '^{"u":"%x+","q":(%d+)'))
    if q and (not oldest or q < oldest) then oldest = q end
  end
end
return {xlen, pending, oldest or -1, retries}
"""
)

HANDBACK_LUA = (
    "#!lua flags=allow-oom\n"
    + _ACTIVATE
    + _REPLY
    + """
-- KEYS: stream, active, wake. ARGV: group, destination, then stream id per entry.
-- Re-adds pending entries as new; one never retried keeps its first enqueue time (its
-- old id's) as "q" in a meta field m of its own, as a retry does (FIRST_ENQUEUED_LUA).
local n = 0
for i = 3, #ARGV do
  local rows = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #rows == 1 and redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    local fields = rows[1][2]
    local meta = false
    for j = 1, #fields, 2 do
      if fields[j] == 'm' then meta = true end
    end
    if not meta then
      fields[#fields + 1] = 'm'
      fields[#fields + 1] = '{"q":' .. string.match(ARGV[i], '^(%d+)') .. '}'
    end
    redis.call('XADD', KEYS[1], '*', unpack(fields))
    redis.call('XDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
if n > 0 then activate(KEYS[2], KEYS[3], ARGV[2]) end
return reply(n)
"""
)

INDEX_RETRIES_LUA = (
    "#!lua flags=allow-oom\n"
    + _INDEX_RETRIES
    + _REPLY
    + """
-- KEYS: retry zset, retry-due index. ARGV: destination. Repairs the index (an upgrade from
-- a version without it).
index_retries(KEYS[1], KEYS[2], ARGV[1])
return reply(1)
"""
)

ENSURE_GROUP_LUA = """#!lua flags=allow-oom
-- KEYS: stream. ARGV: group. Create the stream and group unless they exist.
local ok, err = pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if ok then return 1 end
if string.find(tostring(err), 'BUSYGROUP') then return 0 end
return redis.error_reply(tostring(err))
"""

FORGET_CONSUMER_LUA = """#!lua flags=allow-oom
-- KEYS: stream. ARGV: group, consumer. Drop the consumer only if it holds nothing now: a
-- read served since the caller looked (XINFO CONSUMERS) would go with it (DELCONSUMER
-- drops its pending entries, which no read or reclaim then finds, and which the fate that
-- follows, acknowledging none, records nowhere). 1 if dropped.
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

PURGE_LUA = (
    "#!lua flags=allow-oom\n"
    + DEDUP_HEADER
    + """
-- KEYS: stream, stats. ARGV: dedup prefix, bucket_s, group, then stream id and dedup digest
-- per entry (ascending ids). Deletes the entries no worker has in flight (those finish)
-- and forgets their digests, so the same events may be enqueued again. Dead letters are
-- not touched. Returns the entries deleted.
local pending = {}
if #ARGV >= 5 then
  local ok, rows = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[3], ARGV[4], ARGV[#ARGV - 1],
                         (#ARGV - 3) / 2)
  if ok then for _, row in ipairs(rows) do pending[row[1]] = true end end
end
local n = 0
for i = 4, #ARGV, 2 do
  if not pending[ARGV[i]] and redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    dd_forget(ARGV[i + 1])
    n = n + 1
  end
end
if n > 0 then redis.call('HINCRBY', KEYS[2], 'purged', n) end
return n
"""
)

PURGE_RETRIES_LUA = (
    "#!lua flags=allow-oom\n"
    + DEDUP_HEADER
    + _INDEX_RETRIES
    + _REPLY
    + """
-- KEYS: retry zset, stats, retry-due index. ARGV: dedup prefix, bucket_s, destination, then
-- per retry batch: its member, the number of its events, their dedup digests. Removes the
-- batches still scheduled and forgets their events' digests. Returns the events removed.
local n, i = 0, 4
while i <= #ARGV do
  local count = tonumber(ARGV[i + 1])
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    for j = i + 2, i + 1 + count do dd_forget(ARGV[j]) end
    n = n + count
  end
  i = i + 2 + count
end
index_retries(KEYS[1], KEYS[3], ARGV[3])
if n > 0 then redis.call('HINCRBY', KEYS[2], 'purged', n) end
return reply(n)
"""
)

HEARTBEAT_LUA = """#!lua flags=allow-oom
-- KEYS: workers zset, worker states hash. ARGV: worker, now_ms, state JSON.
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""


DEAD_LETTER_LUA = (
    "#!lua flags=allow-oom\n"
    + DEDUP_HEADER
    + """
-- KEYS: records hash, index zset, stream, stats, reasons.
-- ARGV: dedup prefix, bucket_s, group, number of stream ids, the ids, then record key,
-- JSON, score, reason, dedup digest per record.
-- Records are written only for entries still pending (or with no entry: replay's own), so
-- running it again after a lost answer changes nothing. allow-oom: it frees a stream entry.
-- Each event's dedup digest is forgotten: its corrected successor may be enqueued.
local nids = tonumber(ARGV[4])
if nids > 0 then
  local acked = redis.call('XACK', KEYS[3], ARGV[3], unpack(ARGV, 5, 4 + nids))
  redis.call('XDEL', KEYS[3], unpack(ARGV, 5, 4 + nids))
  if acked == 0 then return 0 end
end
local n = 0
for i = 5 + nids, #ARGV, 5 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], ARGV[i + 2], ARGV[i])
  redis.call('HINCRBY', KEYS[5], ARGV[i + 3], 1)
  dd_forget(ARGV[i + 4])
  n = n + 1
end
redis.call('HINCRBY', KEYS[4], 'dead_lettered', n)
return n
"""
)

REPLAY_LUA = (
    _ACTIVATE
    + _REPLY
    + """
-- KEYS: dead letters hash, index zset, stream, stats, active, wake. ARGV: destination,
-- then dead letter keys. Each record still stored goes back on the stream, once.
local replayed = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local raw = redis.call('HGET', KEYS[1], id)
  if raw then
    local rec = cjson.decode(raw)
    redis.call('XADD', KEYS[3], '*', 'e', rec['event_json'],
               't', string.format('%.0f', rec['timestamp_ms']), 'i', rec['id'])
    redis.call('HDEL', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    replayed[#replayed + 1] = id
  end
end
if #replayed > 0 then
  redis.call('HINCRBY', KEYS[4], 'replayed', #replayed)
  activate(KEYS[5], KEYS[6], ARGV[1])
end
return reply(replayed)
"""
)


async def dead_letter(
    client: aioredis.Redis,
    keys: RedisKeys,
    group: str,
    entries: Sequence[Entry],
    records: Sequence[tuple[str, bytes | str, int, str]],
    *,
    dedup_window_s: int,
) -> None:
    """Store dead letter records, each (key ``name:id``, JSON, dead-lettered at ms, reason),
    acknowledging and deleting their stream entries in the same script (none: a record
    with no entry, as replay's dry run writes). Their dedup digests are forgotten."""
    ids = [e.stream_id for e in entries]
    args: list[Any] = [keys.dedup_prefix, dedup.bucket_s(dedup_window_s), group, len(ids), *ids]
    for key, data, at_ms, reason in records:
        args += [key, data, at_ms, reason, dedup.digest(key)]
    script = client.register_script(DEAD_LETTER_LUA)
    await script(
        keys=[keys.deadletters, keys.deadletter_index, keys.stream, keys.stats, keys.dl_reasons],
        args=args,
    )


async def requeue_dead_letters(
    client: aioredis.Redis, keys: RedisKeys, record_keys: Sequence[str]
) -> list[str]:
    """Put the events of stored dead letters back on the stream, removing the records;
    return the keys that were still stored (a record already replayed is skipped)."""
    script = client.register_script(lua(keys, REPLAY_LUA))
    active, wake, _ = index.script_keys(keys)
    answer = await script(
        keys=[keys.deadletters, keys.deadletter_index, keys.stream, keys.stats, active, wake],
        args=[keys.destination, *record_keys],
    )
    done = await index.settle(client, keys, answer)
    return [d.decode() if isinstance(d, bytes) else str(d) for d in done]


@dataclass(slots=True)
class Entry:
    """One queued event as a worker holds it: the JSON to send and its retry history."""

    stream_id: bytes
    event: bytes
    event_id: str
    timestamp_ms: int
    attempts: int = 0
    meta: dict[str, Any] | None = None
    kinds: int | None = None  # identifier kinds (capi.coverage); None: tell from the JSON

    @classmethod
    def from_fields(cls, stream_id: bytes, fields: dict[bytes, bytes]) -> Entry:
        """Build an entry from a stream entry's fields."""
        meta = fields.get(b"m")
        kinds = fields.get(b"k")
        return cls(
            stream_id=stream_id,
            event=fields[b"e"],
            event_id=fields[b"i"].decode(),
            timestamp_ms=int(fields[b"t"]),
            attempts=int(fields.get(b"n", 0)),
            meta=orjson.loads(meta) if meta else None,
            kinds=int(kinds) if kinds else None,
        )

    @property
    def first_attempt_ms(self) -> int | None:
        """When this event was first sent, if it has been."""
        return self.meta.get("f") if self.meta else None


class Queue:
    """One destination's queue in Redis (its stream, consumer group and retry schedule):
    the worker side of it, and the only writer of its stream entries' fates."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, group: str = CONSUMER_GROUP):
        self.redis = client
        self.keys = keys
        self.group = group
        self._move_due = client.register_script(lua(keys, MOVE_DUE_LUA))
        self._deliver = client.register_script(DELIVER_LUA)
        self._retry = client.register_script(lua(keys, RETRY_LUA))
        self._handback = client.register_script(lua(keys, HANDBACK_LUA))
        self._release = client.register_script(lua(keys, RELEASE_LUA))
        self._endpoint_ok = client.register_script(ENDPOINT_OK_LUA)
        self._ensure_group = client.register_script(ENSURE_GROUP_LUA)
        self._forget_consumer = client.register_script(FORGET_CONSUMER_LUA)
        self._heartbeat = client.register_script(HEARTBEAT_LUA)
        self._read = client.register_script(lua(keys, READ_LUA))
        self._index_retries = client.register_script(lua(keys, INDEX_RETRIES_LUA))
        self._depth = client.register_script(DEPTH_LUA)
        # The index keys as the scripts see them (capi.index.script_keys).
        self._active, self._wake, self._retry_due = index.script_keys(keys)
        # The keys a script that moves retries back to the stream needs (_REQUEUE_MEMBER).
        self._requeue_keys = [keys.retry, keys.stream, self._active, self._wake, self._retry_due]

    async def ensure_group(self) -> bool:
        """Create the stream and consumer group if missing; True if it had to (even when
        Redis is full: a worker must be able to start and drain a full Redis)."""
        created = await self._ensure_group(keys=[self.keys.stream], args=[self.group])
        return bool(created)

    async def read(self, consumer: str, count: int) -> list[Entry]:
        """Read up to ``count`` new entries without waiting; finding none, mark the
        destination inactive (in a script that reads once more first, so nothing
        enqueued meanwhile is missed; a plain read is cheaper for Redis while entries
        come back)."""
        resp = await self.redis.xreadgroup(
            self.group, consumer, {self.keys.stream: ">"}, count=count
        )
        if resp and resp[0][1]:
            return [Entry.from_fields(sid, f) for sid, f in resp[0][1] if f]
        await index.before_empty_read(self.redis, self.keys)
        answer = await self._read(
            keys=[self.keys.stream, self._active],
            args=[self.group, consumer, count, self.keys.destination],
        )
        rows = await index.settle(self.redis, self.keys, answer)
        if rows and self.keys.cluster:  # not empty after all: back in the active set
            await index.arm(self.redis, self.keys, [self.keys.destination])
        return [Entry.from_fields(sid, _pairs(flat)) for sid, flat in rows if flat]

    async def read_more(self, consumer: str, count: int, block_ms: int) -> list[Entry]:
        """Read up to ``count`` new entries, waiting up to ``block_ms`` for the first (to fill
        a batch already begun)."""
        resp = await self.redis.xreadgroup(
            self.group, consumer, {self.keys.stream: ">"}, count=count, block=block_ms
        )
        if not resp:
            return []
        return [Entry.from_fields(sid, f) for sid, f in resp[0][1] if f]

    async def touch(self, consumer: str, stream_ids: Sequence[bytes]) -> None:
        """Renew this worker's hold on entries it is still working on (reset their idle time),
        so that however long a batch takes, no other worker takes them over."""
        for start in range(0, len(stream_ids), 1000):
            await self.redis.xclaim(
                self.keys.stream,
                self.group,
                consumer,
                0,
                list(stream_ids[start : start + 1000]),
                justid=True,
            )

    async def reclaim(
        self,
        consumer: str,
        min_idle_ms: int,
        count: int,
        live_workers: set[str],
        *,
        me: str = "",
        mine: Collection[bytes] = (),
    ) -> list[Entry]:
        """Take over up to ``count`` entries left pending and idle for ``min_idle_ms``.

        Entries of a worker that is no longer alive (no heartbeat) qualify; a live worker's
        never do, however long its batch takes. The exception is this worker's own (``me``)
        entries that it does not hold (``mine``): read, but their answer lost on the way
        (a dropped connection), they would otherwise wait for ever.
        """
        pending = await self.redis.xpending_range(
            self.keys.stream, self.group, min="-", max="+", count=count * 4, idle=min_idle_ms
        )
        ids = []
        for p in pending:
            owner = worker_of(p["consumer"].decode())
            if owner not in live_workers or (owner == me and p["message_id"] not in mine):
                ids.append(p["message_id"])
        ids = ids[:count]
        if not ids:
            return []
        claimed = await self.redis.xclaim(self.keys.stream, self.group, consumer, min_idle_ms, ids)
        gone = [sid for sid, f in claimed if not f]
        if gone:  # deleted from the stream while pending: nothing left to send
            await self.redis.xack(self.keys.stream, self.group, *gone)
        return [Entry.from_fields(sid, f) for sid, f in claimed if f]

    async def reclaim_lost(
        self, consumer: str, me: str, mine: Collection[bytes], min_idle_ms: int, count: int
    ) -> list[Entry]:
        """Take back up to ``count`` entries pending in this worker's own consumers (``me``)
        that it does not hold (``mine``) and that are idle for ``min_idle_ms``: a read whose
        answer was lost (a timeout, or a connection dropped and the call sent again)."""
        consumers = await self.redis.xinfo_consumers(self.keys.stream, self.group)
        ids: list[Any] = []
        for c in consumers:
            name = c["name"].decode() if isinstance(c["name"], bytes) else str(c["name"])
            if worker_of(name) != me or int(c["pending"]) == 0:
                continue
            pending = await self.redis.xpending_range(
                self.keys.stream, self.group, "-", "+", count, consumername=name, idle=min_idle_ms
            )
            ids += [p["message_id"] for p in pending if p["message_id"] not in mine]
            if len(ids) >= count:
                break
        if not ids:
            return []
        claimed = await self.redis.xclaim(
            self.keys.stream, self.group, consumer, min_idle_ms, ids[:count]
        )
        gone = [sid for sid, f in claimed if not f]
        if gone:  # deleted from the stream while pending: nothing left to send
            await self.redis.xack(self.keys.stream, self.group, *gone)
        return [Entry.from_fields(sid, f) for sid, f in claimed if f]

    async def deliver(
        self,
        entries: Sequence[Entry],
        now_ms: int,
        *,
        validated: bool = False,
        counts: Mapping[str, int] | None = None,
    ) -> int | None:
        """Acknowledge delivered entries and count them (as ``validated`` in test mode),
        with the identifier kinds delivered events carried (``counts``, from
        :func:`identifier_counts`, when the caller has them already); if the endpoint was
        marked as failing until now (this delivery ends an outage), since when (ms)."""
        k = self.keys
        counter = "validated" if validated else "delivered"
        if counts is None and not validated:
            counts = identifier_counts(entries)
        matching = b"" if validated else orjson.dumps(counts)
        _, since = await self._deliver(
            keys=[k.stream, k.stats, k.endpoint, k.coverage(coverage.bucket(now_ms))],
            args=[
                self.group,
                now_ms,
                counter,
                matching,
                coverage.TTL_S,
                *(e.stream_id for e in entries),
            ],
        )
        return int(since) if since else None

    async def endpoint_answered(self, now_ms: int) -> int | None:
        """The endpoint answered a probe (nothing was delivered): it is no longer failing, as
        after a delivery (DELIVER_LUA's last lines). Since when it was failing (ms), if it was."""
        since = await self._endpoint_ok(keys=[self.keys.endpoint], args=[now_ms])
        return int(since) if since else None

    async def endpoint_failed(self, now_ms: int, error: str) -> None:
        """The endpoint did not answer a startup key check (5xx, network): marked failing,
        as a retried send marks it (RETRY_LUA's last lines), so ``capi status`` does not
        call an endpoint no worker could reach "ok"."""
        pipe = self.redis.pipeline(transaction=False)  # one key; no MULTI on a cluster
        pipe.hsetnx(self.keys.endpoint, "failing_since", str(now_ms))
        pipe.hset(self.keys.endpoint, mapping={"last_error": error, "last_error_ms": now_ms})
        await pipe.execute()

    async def endpoint_marked_failing(self) -> bool:
        """Whether Redis marks the endpoint as failing (any worker's failures, a worker
        since stopped included)."""
        return bool(await aw(self.redis.hexists(self.keys.endpoint, "failing_since")))

    async def release_retries(self) -> int:
        """Move every scheduled retry to the stream now, except those waiting out a
        ``Retry-After``; return how many events moved."""
        moved = skipped = 0
        while True:
            await index.before_retry_change(self.redis, self.keys)
            answer = await self._release(
                keys=self._requeue_keys, args=[skipped, 200, self.keys.destination]
            )
            n, skipped, rows = await index.settle(self.redis, self.keys, answer)
            moved += int(n)
            if int(rows) == 0:
                return moved

    async def schedule_retry(
        self,
        entries: Sequence[Entry],
        due_ms: int,
        error: dict[str, Any],
        now: int,
        *,
        endpoint_error: str = "",
        server_asked: bool = False,
    ) -> None:
        """Move entries to the retry schedule, due at ``due_ms``, atomically with the ack;
        with ``endpoint_error``, mark the endpoint as failing (since now, unless it already
        was); ``server_asked`` when the wait is the server's own (``Retry-After``)."""
        rows = []
        oldest = now
        for e in entries:
            meta = dict(e.meta or {})
            meta.setdefault("f", now)
            meta.setdefault("q", int(e.stream_id.split(b"-")[0]))  # first enqueued (ms)
            oldest = min(oldest, meta["q"])
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
            if e.kinds is not None:
                rows[-1]["k"] = str(e.kinds)
        # "q" second: DEPTH_LUA reads it from the member's start.
        batch: dict[str, Any] = {"u": uuid.uuid4().hex, "q": oldest, "entries": rows}
        if server_asked:
            batch["ra"] = 1  # the wait is the server's (Retry-After): never cut short
        member = orjson.dumps(batch)
        k = self.keys
        await index.before_retry_change(self.redis, k)
        answer = await self._retry(
            keys=[k.stream, k.retry, k.stats, k.endpoint, self._retry_due],
            args=[
                self.group,
                due_ms,
                member,
                now,
                endpoint_error,
                k.destination,
                *(e.stream_id for e in entries),
            ],
        )
        await index.settle(self.redis, k, answer)

    async def move_due_retries(self, now_ms: int | str, max_batches: int = 100) -> int:
        """Put retries due by ``now_ms`` (``"+inf"``: all) back on the stream; return how
        many events moved."""
        await index.before_retry_change(self.redis, self.keys)
        answer = await self._move_due(
            keys=self._requeue_keys, args=[now_ms, max_batches, self.keys.destination]
        )
        return int(await index.settle(self.redis, self.keys, answer))

    async def index_retries(self) -> None:
        """Set this destination's entry in the retry-due index from its retry schedule."""
        await index.before_retry_change(self.redis, self.keys)
        answer = await self._index_retries(
            keys=[self.keys.retry, self._retry_due], args=[self.keys.destination]
        )
        await index.settle(self.redis, self.keys, answer)

    async def hand_back(self, entries: Sequence[Entry]) -> None:
        """Return entries to the queue as new (on shutdown, when the key is already held, or
        after a bug in a turn), so any worker takes them at once."""
        if entries:
            k = self.keys
            answer = await self._handback(
                keys=[k.stream, self._active, self._wake],
                args=[self.group, k.destination, *(e.stream_id for e in entries)],
            )
            await index.settle(self.redis, k, answer)

    async def drained(self) -> bool:
        """Whether nothing is queued, in flight, or scheduled for retry."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(self.keys.stream)
        pipe.zcard(self.keys.retry)
        queued, retries = await pipe.execute()
        return int(queued) == 0 and int(retries) == 0

    async def depth(self) -> tuple[int, int, int | None, int]:
        """Queued (not yet read), in flight, the first enqueue time (ms) of the oldest event
        not yet delivered (the stream's first entry, queued or in flight, and every scheduled
        retry; an entry queued again counts from its first enqueue: FIRST_ENQUEUED_LUA),
        scheduled retry batches: one snapshot, read by one script."""
        xlen, in_flight, oldest, retries = await self._depth(
            keys=[self.keys.stream, self.keys.retry], args=[self.group]
        )
        oldest_ms = int(oldest) if int(oldest) >= 0 else None
        return max(0, int(xlen) - int(in_flight)), int(in_flight), oldest_ms, int(retries)

    async def purge(self, dedup_window_s: int, chunk: int = 500) -> tuple[int, int]:
        """Delete every scheduled retry and queued event of this destination, except the
        entries a worker has in flight (they finish), and forget their dedup digests (the
        same events may be enqueued again); dead letters stay. In chunks, so Redis is never
        blocked for long. Returns (queued events, retry events) deleted."""
        k = self.keys
        head = [k.dedup_prefix, dedup.bucket_s(dedup_window_s)]
        # Retries first: one coming due meanwhile moves to the stream, purged next.
        retries_script = self.redis.register_script(lua(k, PURGE_RETRIES_LUA))
        retried = 0
        while members := await self.redis.zrange(k.retry, 0, chunk // 10):
            args: list[Any] = [*head, k.destination]
            for member in members:
                rows = orjson.loads(member)["entries"]
                args += [member, len(rows)]
                args += [dedup.digest(_key_of(row["e"], row["i"])) for row in rows]
            await index.before_retry_change(self.redis, k)
            answer = await retries_script(keys=[k.retry, k.stats, self._retry_due], args=args)
            retried += int(await index.settle(self.redis, k, answer))
        script = self.redis.register_script(PURGE_LUA)
        queued, start = 0, "-"
        while rows := await self.redis.xrange(k.stream, start, "+", count=chunk):
            args = [*head, self.group]
            for stream_id, fields in rows:
                args += [stream_id, dedup.digest(_key_of(fields[b"e"], fields[b"i"]))]
            queued += int(await script(keys=[k.stream, k.stats], args=args))
            start = "(" + rows[-1][0].decode()
        return queued, retried

    async def heartbeat(self, worker: str, now_ms: int, state: dict[str, Any]) -> None:
        """Record that this worker is alive, and what it is doing (for ``capi status``)."""
        await self._heartbeat(
            keys=[self.keys.workers, self.keys.worker_states],
            args=[worker, now_ms, orjson.dumps(state)],
        )

    async def sign_off(self, worker: str) -> None:
        """Remove a stopping worker from the heartbeats, so status drops it at once."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(self.keys.workers, worker)
        pipe.hdel(self.keys.worker_states, worker)
        await pipe.execute()

    async def live_workers(self, now_ms: int, within_ms: int) -> set[str]:
        """Workers whose last heartbeat is at most ``within_ms`` old."""
        names = await self.redis.zrangebyscore(self.keys.workers, now_ms - within_ms, "+inf")
        return {n.decode() for n in names}

    async def forget_stopped(
        self,
        now_ms: int,
        idle_ms: int,
        *,
        live: Collection[str] = (),
        silent_ms: int | None = None,
    ) -> None:
        """Drop consumers that hold nothing and have been idle for ``idle_ms`` (or, with
        ``silent_ms``, for that long when their worker is not ``live``: its heartbeat is
        gone), and the heartbeats of workers silent for ``idle_ms``. A consumer dropped
        while its worker still runs costs nothing: its next read creates it again; one
        whose read was served meanwhile holds entries, and is kept."""
        consumers = await self.redis.xinfo_consumers(self.keys.stream, self.group)
        for c in consumers:
            name = c["name"].decode() if isinstance(c["name"], bytes) else str(c["name"])
            idle = int(c["idle"])
            gone = silent_ms is not None and worker_of(name) not in live and idle > silent_ms
            if int(c["pending"]) == 0 and (idle > idle_ms or gone):
                # Checked again where it is dropped: it may have read since XINFO answered.
                await self._forget_consumer(keys=[self.keys.stream], args=[self.group, name])
        gone = await self.redis.zrangebyscore(self.keys.workers, "-inf", now_ms - idle_ms)
        if gone:
            await self.redis.zrem(self.keys.workers, *gone)
            await aw(self.redis.hdel(self.keys.worker_states, *gone))


def _key_of(event: bytes | str, event_id: bytes | str) -> str:
    """The dedup key (``name:id``) of a stream entry's or retry member's event."""
    eid = event_id.decode() if isinstance(event_id, bytes) else event_id
    try:
        return dedup.event_key(orjson.loads(event), eid)
    except (ValueError, TypeError, AttributeError):  # unreadable: nothing to forget
        return f"(unreadable):{eid}"


def identifier_counts(entries: Iterable[Entry]) -> dict[str, int]:
    """How many of ``entries`` carry each identifier kind (:func:`capi.coverage.count`)."""
    return coverage.count(map(_kinds, entries))


def _kinds(entry: Entry) -> int:
    return entry.kinds if entry.kinds is not None else coverage.mask_of_json(entry.event)


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def worker_of(consumer: str) -> str:
    """The worker a consumer name belongs to (consumers are ``{worker}:{lane}``)."""
    return consumer.rsplit(":", 1)[0]
