"""The shared index of destinations: which may have entries no worker has read
(``{p}:active``, announced on the ``{p}:wake`` stream) and when each one's earliest retry
is due (``{p}:retry-due``). Key names: :mod:`capi.constants`.

On one Redis the queue's scripts (:mod:`capi.queue`) write the index in the same script as
the stream or the retry schedule, atomically. On a Redis Cluster they cannot: each
destination's keys live in the slot of its own hash tag and the index in another, and no
script may cross slots. There the Lua below (:func:`for_cluster`) makes each script write
only within its destination's slot and report what the index needs; :func:`settle` then
writes the index, in an order that keeps it true without atomicity:

- active: every write to a stream sets ``{d}:armed`` (``SET NX``); the script reports
  whether it set it, and then (only then) its caller adds the destination to the active
  set and, if it was not there, wakes the workers. A worker that finds a stream empty first
  removes the destination from the set (:func:`before_empty_read`), then its read script
  reads once more and clears the flag only if it found nothing; if it found entries, the
  worker adds the destination back. So a destination with unread entries is in the set,
  or about to be: after the last removal comes its worker's read, which either finds the
  entries (and the worker adds the destination back) or clears the flag, so that the next
  write sets it again and its writer adds the destination.
- retry-due: a script that changes a retry schedule reports the earliest retry left; its
  caller first removes the destination from the index (:func:`before_retry_change`) and
  afterwards adds that time with ``ZADD LT``. After any interleaving the index holds a time
  no later than the earliest retry as the last script left it (every removal is followed
  by its own add, and times only fall between scripts that add retries). A time too early
  costs one look that finds nothing due, and corrects it.
- a process killed between its two steps (or an index shard that failed over and lost its
  last writes) leaves a flag without its entry, or a schedule without its time: each worker
  sweeps the destinations it serves every ``SWEEP_S`` (:func:`sweep`).

Worker heartbeats share the index's slot. Nothing else is shared by destinations.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis

from capi._aio import aw
from capi.constants import RedisKeys

# How often a worker on a cluster repairs the index from the destinations' own keys.
SWEEP_S = 5.0

# Lua shared by the queue's scripts on one Redis. Each script that uses these ends with
# `return reply(x)`.
ACTIVATE = """
local function activate(active, wake, name)
  if redis.call('SADD', active, name) == 1 then
    redis.call('XADD', wake, 'MAXLEN', '~', '1000', '*', 'd', name)
  end
end
local function deactivate(active, name)
  redis.call('SREM', active, name)
end
"""

INDEX_RETRIES = """
local function index_retries(zset, index, name)
  local first = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
  if #first == 0 then
    redis.call('ZREM', index, name)
  else
    redis.call('ZADD', index, first[2], name)
  end
end
"""

REPLY = """
local function reply(r) return r end
"""

# The same functions on a cluster: the first key argument is the destination's flag
# ({d}:armed), the index keys are not touched, and the reply carries what settle() needs:
# {answer, 1 if this script set the flag, the earliest retry ('-': not looked at; '': none)}.
_ACTIVATE_CLUSTER = """
local armed_now = 0
local function activate(armed, _, name)
  if redis.call('SET', armed, '1', 'NX') then armed_now = 1 end
end
local function deactivate(armed, name)
  redis.call('DEL', armed)
end
"""

_INDEX_RETRIES_CLUSTER = """
local earliest = '-'
local function index_retries(zset, index, name)
  local first = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
  earliest = first[2] or ''
end
"""

_REPLY_CLUSTER = """
local function reply(r) return {r, armed_now, earliest} end
"""

ARM_LUA = """#!lua flags=allow-oom
-- KEYS: active set, wake stream. ARGV: destinations whose flag ({d}:armed) was just set.
-- Cluster only (see capi.index): each goes into the active set; one that was not there
-- wakes the workers.
for _, name in ipairs(ARGV) do
  if redis.call('SADD', KEYS[1], name) == 1 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', '1000', '*', 'd', name)
  end
end
return 1
"""

# KEYS: the retry-due index. ARGV: destination, time, destination, time... Cluster only
# (see capi.index): each destination's earliest retry, kept where an earlier one is there
# (ZADD LT). allow-oom: the index is small, and every destination's retries wait on it; on
# one Redis the retry scripts (allow-oom too) write it themselves.
DUE_LUA = """#!lua flags=allow-oom
for i = 1, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], 'LT', ARGV[i + 1], ARGV[i])
end
return 1
"""


def for_cluster(script: str) -> str:
    """A queue script as it runs on a cluster: the same body, with the index functions
    above swapped for their single-slot twins."""
    swapped = script.replace(ACTIVATE, _ACTIVATE_CLUSTER)
    swapped = swapped.replace(INDEX_RETRIES, _INDEX_RETRIES_CLUSTER)
    declared = "" if "armed_now" in swapped else "local armed_now = 0\n"
    declared += "" if "local earliest" in swapped else "local earliest = '-'\n"
    return swapped.replace(REPLY, "\n" + declared + _REPLY_CLUSTER.lstrip("\n"))


def script_keys(keys: RedisKeys) -> tuple[str, str, str]:
    """The keys a queue script is given for the active set, the wake stream and the
    retry-due index: the shared ones on one Redis; on a cluster, keys of the destination's
    own slot (its flag, and its retry schedule, which the cluster twins do not write)."""
    if keys.cluster:
        return keys.armed, keys.armed, keys.retry
    return keys.active, keys.wake, keys.retry_due


def unpack(keys: RedisKeys, answer: Any) -> tuple[Any, bool, str | None]:
    """A script's answer, whether it set its destination's flag, and the earliest retry it
    left ('' for none; None: it did not look). On one Redis: the answer as it is."""
    if not keys.cluster:
        return answer, False, None
    result, armed, earliest = answer
    text = earliest.decode() if isinstance(earliest, bytes) else str(earliest)
    return result, bool(int(armed)), None if text == "-" else text


async def settle(client: aioredis.Redis, keys: RedisKeys, answer: Any) -> Any:
    """Write to the index what a queue script's answer reports (cluster only); return the
    answer as one Redis would have given it."""
    result, armed, earliest = unpack(keys, answer)
    if armed:
        await arm(client, keys, [keys.destination])
    if earliest:
        await due(client, keys, {keys.destination: earliest})
    return result


async def arm(client: aioredis.Redis, keys: RedisKeys, names: Collection[str]) -> None:
    """Add destinations whose flag was set to the active set, waking the workers for each
    that was not there (cluster only)."""
    if names:
        await client.register_script(ARM_LUA)(keys=[keys.active, keys.wake], args=list(names))


async def due(client: aioredis.Redis, keys: RedisKeys, earliest: dict[str, str | float]) -> None:
    """Set destinations' earliest retries in the retry-due index, each kept where an
    earlier one is there (cluster only); on a full Redis too (:data:`DUE_LUA`)."""
    if earliest:
        args = [str(x) for pair in earliest.items() for x in pair]
        await client.register_script(DUE_LUA)(keys=[keys.retry_due], args=args)


def arm_sync(client: redis.Redis, keys: RedisKeys, names: Collection[str]) -> None:
    """:func:`arm` for a blocking client."""
    if names:
        client.register_script(ARM_LUA)(keys=[keys.active, keys.wake], args=list(names))


async def before_empty_read(client: aioredis.Redis, keys: RedisKeys) -> None:
    """Before a read that may find the stream empty: leave the active set (cluster only;
    the read puts the destination back if it finds entries)."""
    if keys.cluster:
        await aw(client.srem(keys.active, keys.destination))


async def before_retry_change(client: aioredis.Redis, keys: RedisKeys) -> None:
    """Before a script that changes the retry schedule: leave the retry-due index (cluster
    only; :func:`settle` adds the earliest retry the script leaves)."""
    if keys.cluster:
        await client.zrem(keys.retry_due, keys.destination)


async def sweep(client: aioredis.Redis, keys: Sequence[RedisKeys]) -> list[str]:
    """Put back in the index what a process killed between two steps left out: every flagged
    destination in the active set, every destination's earliest retry in the retry-due index
    (cluster only; one pipelined round trip per shard). Returns the flagged destinations."""
    if not keys or not keys[0].cluster:
        return []
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.exists(k.armed)
        pipe.zrange(k.retry, 0, 0, withscores=True)
    answers = await pipe.execute()
    flagged = [k.destination for k, n in zip(keys, answers[::2], strict=True) if int(n)]
    earliest = {
        k.destination: first[0][1] for k, first in zip(keys, answers[1::2], strict=True) if first
    }
    await arm(client, keys[0], flagged)
    await due(client, keys[0], earliest)
    return flagged
