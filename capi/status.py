"""What ``capi status`` shows: queue depth and age, in flight, retries, counters, key state,
the endpoint's state, match coverage, Redis's memory, and each live worker with what it is
doing."""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis.asyncio as aioredis
import redis.exceptions

from capi import coverage
from capi.constants import RedisKeys
from capi.queue import Queue

# A worker heartbeats every second; one silent this long is not counted as alive.
ALIVE_WITHIN_MS = 5_000


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
    now = int(time.time() * 1000)
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
    failing_since = int(ep["failing_since"]) if ep.get("failing_since") else None
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
        "key": {k.decode(): v.decode() for k, v in key.items()} or {"state": "unknown"},
        "endpoint": {
            "state": "failing" if failing_since else "ok",
            "failing_since": _iso(failing_since),
            "last_error": ep.get("last_error") if failing_since else None,
            "last_error_at": _iso(int(ep.get("last_error_ms") or 0)),
            "last_ok_at": _iso(int(ep.get("last_ok_ms") or 0)),
        },
        "match_coverage": matching,
    }


async def shared_status(client: aioredis.Redis, keys: RedisKeys) -> dict[str, Any]:
    """The part of :func:`gather` every destination shares: live workers and Redis."""
    now = int(time.time() * 1000)
    pipe = client.pipeline(transaction=False)
    pipe.zrangebyscore(keys.workers, now - ALIVE_WITHIN_MS, "+inf", withscores=True)
    pipe.hgetall(keys.worker_states)
    workers, states = await pipe.execute()
    try:
        memory = await client.info("memory")
        role = str((await client.info("replication")).get("role", "master"))
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
            "full": redis_full(memory),
            "role": role,
        },
    }


def redis_full(memory: dict[str, Any]) -> bool:
    """Whether Redis refuses new writes for want of memory (``INFO memory`` fields)."""
    limit = int(memory.get("maxmemory", 0) or 0)
    used = int(memory.get("used_memory", 0) or 0)
    return limit > 0 and used >= limit and memory.get("maxmemory_policy") == "noeviction"
