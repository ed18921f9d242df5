"""The dedup record: which events were enqueued within the window, at ~31 bytes each.

The API dedups on pixel + event name + id, and so does capi, at enqueue: an event whose
name and id were enqueued within ``CAPI_DEDUP_WINDOW_S`` is not queued again.

A key per event (``SET NX EX``) costs ~140 bytes of Redis for the whole window: 12 GB at
1,000 events/s. Instead each event leaves a 16-byte BLAKE2b digest of its ``name:id``,
appended to a string shared by many events:

- time is cut into buckets of a quarter window; an event's digest goes into the bucket of
  the moment it is enqueued (Redis's own clock, so producers' clocks do not matter);
- within a bucket, digests are spread over 16,384 shard strings by their first 14 bits:
  ``{p}:dd:{bucket}:{shard}``, each expiring when its bucket leaves the window (at 1,000
  events/s a shard holds ~1,300 digests, 21 KB, searched in microseconds);
- an event is a duplicate if its digest is in the shard of any of the last five buckets
  (which cover at least one window), found with a plain substring search at a 16-byte
  boundary.

(16 bytes of digest, plus the strings' growth slack and their keys: ~31 bytes an event
measured over a million events, ``tests/benchmarks/bench.py``.)

A 128-bit digest never makes two different events look alike in practice (a collision
among 10^12 events has odds near 10^-15), so no unique event is dropped as a duplicate.
A dead-lettered event's digest is removed (``dd_forget``, run by the dead-letter script),
so its corrected successor, enqueued under the same id, is sent: the API dedups only on
events it accepted. The Lua below is the only code that reads or writes these strings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

DIGEST_BYTES = 16
# Buckets per window: lookups read BUCKETS + 1 shards; a digest lives 1 to 1.25 windows.
BUCKETS = 4


def digest(record_key: str) -> bytes:
    """The digest of an event's dedup key, ``name:id`` (the dead letter's record key)."""
    return hashlib.blake2b(
        record_key.encode("utf-8", "surrogatepass"), digest_size=DIGEST_BYTES
    ).digest()


def event_key(event: Mapping[str, Any], event_id: str) -> str:
    """An event's dedup key, ``name:id``: the name the API dedups on (as
    :attr:`capi.schema.Event.name` gives it: the custom event name lowercased, or the
    type) and the id. Also a dead letter's record key."""
    custom = event.get("type") == "custom" and event.get("custom_event_name")
    name = str(event["custom_event_name"]).lower() if custom else str(event.get("type"))
    return f"{name}:{event_id}"


def bucket_s(window_s: int) -> int:
    """The length of a bucket: a quarter of the window, rounded up."""
    return max(1, -(-window_s // BUCKETS))


# Lua shared by the enqueue and dead-letter scripts. Needs: `dd_prefix`, `dd_bucket_s`,
# `dd_now` (seconds, from TIME). Each function takes a 16-byte digest.
LUA_FUNCTIONS = """
local function dd_key(b, d)
  local shard = string.byte(d, 1) * 64 + math.floor(string.byte(d, 2) / 4)
  return dd_prefix .. b .. ':' .. string.format('%04x', shard)
end
local function dd_find(s, d)
  local pos = 1
  while true do
    local f = string.find(s, d, pos, true)
    if not f then return nil end
    if (f - 1) % 16 == 0 then return f end
    pos = f + 1
  end
end
local function dd_seen(d)
  local b = math.floor(dd_now / dd_bucket_s)
  for k = b - 4, b do
    local s = redis.call('GET', dd_key(k, d))
    if s and dd_find(s, d) then return true end
  end
  return false
end
local function dd_add(d)
  local b = math.floor(dd_now / dd_bucket_s)
  local key = dd_key(b, d)
  if redis.call('APPEND', key, d) == 16 then
    redis.call('EXPIREAT', key, (b + 5) * dd_bucket_s)
  end
end
local function dd_forget(d)
  local b = math.floor(dd_now / dd_bucket_s)
  for k = b - 4, b do
    local key = dd_key(k, d)
    local s = redis.call('GET', key)
    local f = s and dd_find(s, d)
    if f then
      local rest = string.sub(s, 1, f - 1) .. string.sub(s, f + 16)
      if #rest == 0 then redis.call('DEL', key) else redis.call('SET', key, rest, 'KEEPTTL') end
      return true
    end
  end
  return false
end
"""
