"""What ``capi status`` shows: queue depth and age, in flight, retries, counters, key state,
the endpoint's state, match coverage, Redis's memory, and each live worker with what it is
doing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster

from capi import coverage
from capi.clock import LIVENESS_MS, now_ms
from capi.constants import CONSUMER_GROUP, RedisKeys
from capi.queue import FIRST_ENQUEUED_LUA, Queue
from capi.redisconn import is_cluster


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


async def gather(client: aioredis.Redis, keys: RedisKeys) -> dict[str, Any]:
    """A snapshot of one destination's queue, counters, key state and endpoint, and of the
    workers and Redis they share, as JSON-ready data."""
    return {**await destination_status(client, keys), **await shared_status(client, keys)}


async def destination_status(client: aioredis.Redis, keys: RedisKeys) -> dict[str, Any]:
    """One destination's part of :func:`gather`."""
    now = now_ms()
    queued, in_flight, oldest_ms, retries = await Queue(client, keys).depth()
    pipe = client.pipeline(transaction=False)
    pipe.zrange(keys.retry, 0, 0, withscores=True)
    pipe.hgetall(keys.stats)
    pipe.hgetall(keys.dl_reasons)
    pipe.hgetall(keys.key_state)
    pipe.hlen(keys.deadletters)
    pipe.hgetall(keys.endpoint)
    next_retry, stats, reasons, key, dl, endpoint = await pipe.execute()
    ep = {k.decode(): v.decode() for k, v in endpoint.items()}
    matching = await coverage.read(client, keys, now)
    return {
        "queued": queued,
        "in_flight": in_flight,
        "oldest_queued_age_s": round((now - oldest_ms) / 1000, 3) if oldest_ms else None,
        "retry_batches_scheduled": retries,
        "next_retry_in_s": round((next_retry[0][1] - now) / 1000, 3) if next_retry else None,
        "counters": {k.decode(): int(v) for k, v in stats.items()},
        "dead_letters": int(dl),
        # All-time totals (a replayed or purged dead letter still counts), not the current.
        "dead_letters_by_reason": {k.decode(): int(v) for k, v in reasons.items()},
        "key": key_state({k.decode(): v.decode() for k, v in key.items()}, now),
        "endpoint": endpoint_state(ep),
        "match_coverage": matching,
    }


# A confirmation older than this was left by a worker that stopped mid-way: not shown.
CONFIRMING_FRESH_MS = 300_000


def key_state(fields: dict[str, str], now_ms: int) -> dict[str, str]:
    """The key state hash as shown: ``state`` is ok, held, confirming (probes are deciding
    whether a key problem holds the key: ``confirming_since``, ``confirming_reason``) or
    unchecked (never checked)."""
    shown = dict(fields)
    shown.setdefault("state", "unchecked")
    since = fields.get("confirming_since")
    if since and shown["state"] != "held":
        try:
            at_ms = datetime.fromisoformat(since).timestamp() * 1000
        except ValueError:
            at_ms = 0
        if now_ms - at_ms < CONFIRMING_FRESH_MS:
            shown["state"] = "confirming"
    return shown


async def shared_status(client: aioredis.Redis, keys: RedisKeys) -> dict[str, Any]:
    """The part of :func:`gather` every destination shares: live workers and Redis."""
    now = now_ms()
    pipe = client.pipeline(transaction=False)
    pipe.zrangebyscore(keys.workers, now - LIVENESS_MS, "+inf", withscores=True)
    pipe.hgetall(keys.worker_states)
    workers, states = await pipe.execute()
    shards: list[dict[str, Any]] = []
    replicas: list[dict[str, Any]] | None = None
    try:
        if is_cluster(client):
            memory, shards = await cluster_memory(client)
            role = "cluster"
        else:
            memory = await client.info("memory")
            replication = await client.info("replication")
            role = str(replication.get("role", "master"))
            replicas = replicas_of(replication)
    except redis.exceptions.ResponseError:  # INFO may be denied to capi's Redis user
        memory, role = {}, "unknown"
    live = []
    for name, score in workers:
        state = orjson.loads(states.get(name) or b"{}")
        live.append(
            {
                "name": name.decode(),
                "state": state.get("state", "unknown"),
                "detail": state.get("detail", ""),
                "destination": state.get("destination", "default"),
                "last_seen_s": round(max(0, now - score) / 1000, 1),
            }
        )
    return {
        "workers_alive": [w["name"] for w in live],
        "workers": live,
        "redis": {
            "used_memory": int(memory.get("used_memory", 0)),
            "maxmemory": int(memory.get("maxmemory", 0)),
            "maxmemory_policy": str(memory.get("maxmemory_policy", "")),
            "full": redis_full(memory) or any(s["full"] for s in shards),
            "role": role,
            **({"shards": shards} if shards else {}),
            **({"replicas": replicas} if replicas is not None else {}),
        },
    }


# A replica acknowledges its offset once a second (and at once when a WAIT asks): one that
# has not for longer confirms no WAIT, so CAPI_ENQUEUE_DURABILITY=replica enqueues fail.
REPLICA_LAG_OK_S = 2


def replicas_of(replication: dict[str, Any]) -> list[dict[str, Any]]:
    """A master's replicas from ``INFO replication``: each one's state, and the seconds
    since it last acknowledged (``lag_s``)."""
    found = []
    for name, value in replication.items():
        if str(name).startswith("slave") and isinstance(value, dict):
            found.append({"state": str(value.get("state", "")), "lag_s": int(value.get("lag", 0))})
    return found


def confirming(replicas: list[dict[str, Any]]) -> int:
    """How many replicas can confirm a WAIT now: online, and acknowledged lately."""
    return sum(1 for r in replicas if r["state"] == "online" and r["lag_s"] <= REPLICA_LAG_OK_S)


async def _per_master(client: aioredis.Redis, section: str) -> dict[str, dict[str, Any]]:
    """``INFO section`` of every master of a cluster, by address. redis-py answers a
    cluster of one master with that master's INFO itself, not by address."""
    answers: Any = await client.info(section, target_nodes=RedisCluster.PRIMARIES)
    names = [node.name for node in cast(Any, client).get_primaries()]
    if len(names) == 1 and names[0] not in answers:
        return {names[0]: answers}
    return cast(dict[str, dict[str, Any]], answers)


async def cluster_confirming(client: aioredis.Redis) -> dict[str, int]:
    """Per master of a cluster (by address, as :func:`cluster_memory` names it), how many of
    its replicas can confirm a WAIT now (:func:`confirming`)."""
    answers = await _per_master(client, "replication")
    return {str(node): confirming(replicas_of(info)) for node, info in answers.items()}


async def cluster_memory(client: aioredis.Redis) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A cluster's memory: the masters' totals (``INFO memory`` fields), and per master its
    address, memory, limit and whether it is full."""
    answers = await _per_master(client, "memory")
    shards: list[dict[str, Any]] = [
        {
            "node": str(node),
            "used_memory": int(info.get("used_memory", 0)),
            "maxmemory": int(info.get("maxmemory", 0)),
            "full": redis_full(info),
        }
        for node, info in sorted(answers.items())
    ]
    total = {
        "used_memory": sum(s["used_memory"] for s in shards),
        "maxmemory": sum(s["maxmemory"] for s in shards),
    }
    return total, shards


async def destinations_in_redis(client: aioredis.Redis, keys: RedisKeys) -> list[str]:
    """Every destination with counters in Redis (configured or not), found by a scan of
    the prefix (for operators' commands, not for a hot path)."""
    found: set[str] = set()
    if keys.cluster:  # every shard is scanned; each name is in braces, the default's too
        head, tail = f"{keys.prefix}:d:{{", "}:stats"
    else:
        head, tail = f"{keys.prefix}:d:", ":stats"
        if await client.exists(keys.stats):
            found.add("default")
    async for raw in client.scan_iter(match=f"{head}*{tail}", count=1000):
        name = raw.decode()[len(head) : -len(tail)]
        if ":" not in name and "}" not in name:
            found.add(name)
    return sorted(found)


async def stranded(
    client: aioredis.Redis, keys: RedisKeys, configured: Collection[str]
) -> dict[str, dict[str, Any]]:
    """Destinations that are not configured (any more) but still hold events queued, in
    flight, scheduled for retry, or dead letters, with their :func:`destination_status`.

    The typical case: events queued under ``default`` before a destinations file was added.
    No worker sends them until the destination is configured again.
    """
    out = {}
    for name in await destinations_in_redis(client, keys):
        if name in configured:
            continue
        status = await destination_status(client, keys.for_destination(name))
        if any(status[what] for what in WAITING):
            out[name] = status
    return out


# What makes a destination's keys worth showing: something still waits in them.
WAITING = ("queued", "in_flight", "retry_batches_scheduled", "dead_letters")


def redis_full(memory: dict[str, Any]) -> bool:
    """Whether Redis refuses new writes for want of memory (``INFO memory`` fields)."""
    limit = int(memory.get("maxmemory", 0) or 0)
    used = int(memory.get("used_memory", 0) or 0)
    return limit > 0 and used >= limit and memory.get("maxmemory_policy") == "noeviction"


# no-writes: a read (it may run on a replica). Each call covers a chunk of destinations, so
# that Redis is never busy with one call for long.
OVERVIEW_LUA = (
    "#!lua flags=no-writes\n"
    + FIRST_ENQUEUED_LUA
    + """
-- KEYS: six per destination: stream, retry zset, stats, dead letters, key state, endpoint.
-- ARGV[1]: the consumer group. Returns, per destination: {XLEN, the first enqueue time (ms)
-- of the first entry or '' (FIRST_ENQUEUED_LUA),
-- scheduled retries, entries in flight (-1 before the group exists), stats, dead letters,
-- key state, endpoint} (hashes as flat field, value lists).
local group = ARGV[1]
local out = {}
for i = 1, #KEYS, 6 do
  local stream, retry, stats, dl, key, endpoint =
    KEYS[i], KEYS[i + 1], KEYS[i + 2], KEYS[i + 3], KEYS[i + 4], KEYS[i + 5]
  local first = first_enqueued(stream)
  local pending = redis.pcall('XPENDING', stream, group)
  local in_flight = -1
  if type(pending) == 'table' and pending.err == nil then in_flight = pending[1] end
  out[#out + 1] = {
    redis.call('XLEN', stream), first and string.format('%.0f', first) or '',
    redis.call('ZCARD', retry), in_flight, redis.call('HGETALL', stats), redis.call('HLEN', dl),
    redis.call('HGETALL', key), redis.call('HGETALL', endpoint)}
end
return out
"""
)
OVERVIEW_CHUNK = 100  # destinations per script call


def _pairs(flat: list[bytes]) -> dict[str, str]:
    return {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}


async def overview(
    client: aioredis.Redis, keys: RedisKeys, names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """For each destination of ``names`` (the console shows 1,000 at once): queued, in
    flight, the oldest age, scheduled retries, counters, dead letters, key and endpoint
    state; the fields of :func:`destination_status` without match coverage and the next
    retry. One read-only script call per :data:`OVERVIEW_CHUNK` destinations, pipelined;
    only destinations with retries scheduled cost one more round trip each (the oldest
    retry's age)."""
    now = now_ms()
    script = client.register_script(OVERVIEW_LUA)
    # On a Redis Cluster a script's keys must share a slot, and redis-py sends no script in
    # a cluster pipeline: one call per destination there, all at once.
    size = 1 if keys.cluster else OVERVIEW_CHUNK
    calls = []
    for start in range(0, len(names), size):
        chunk = [keys.for_destination(n) for n in names[start : start + size]]
        slots = [
            (k.stream, k.retry, k.stats, k.deadletters, k.key_state, k.endpoint) for k in chunk
        ]
        calls.append([key for six in slots for key in six])
    if keys.cluster:
        answers = await asyncio.gather(*(script(keys=c, args=[CONSUMER_GROUP]) for c in calls))
    else:
        pipe = client.pipeline(transaction=False)
        for c in calls:
            await script(keys=c, args=[CONSUMER_GROUP], client=pipe)
        answers = await pipe.execute()
    rows = [row for answer in answers for row in answer]
    out: dict[str, dict[str, Any]] = {}
    for name, row in zip(names, rows, strict=True):
        xlen, first, retries, pending, stats, dl, key, endpoint = row
        in_flight = max(0, int(pending))  # -1: no group yet, nothing in flight
        oldest = int(first) if first else None
        if retries:
            oldest = (await Queue(client, keys.for_destination(name)).depth())[2]
        out[name] = {
            "queued": max(0, int(xlen) - in_flight),
            "in_flight": in_flight,
            "oldest_queued_age_s": round((now - oldest) / 1000, 3) if oldest else None,
            "retry_batches_scheduled": int(retries),
            "counters": {k: int(v) for k, v in _pairs(stats).items()},
            "dead_letters": int(dl),
            "key": key_state(_pairs(key), now),
            "endpoint": endpoint_state(_pairs(endpoint)),
        }
    return out


def endpoint_state(fields: dict[str, str]) -> dict[str, str | None]:
    """The endpoint hash as shown: ``state`` failing (since when, the last error) or ok."""
    failing_since = int(fields["failing_since"]) if fields.get("failing_since") else None
    return {
        "state": "failing" if failing_since else "ok",
        "failing_since": _iso(failing_since),
        "last_error": fields.get("last_error") if failing_since else None,
        "last_error_at": _iso(int(fields.get("last_error_ms") or 0)),
        "last_ok_at": _iso(int(fields.get("last_ok_ms") or 0)),
    }
