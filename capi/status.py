"""What ``capi status`` shows: queue depth and age, in flight, retries, counters, key state,
the endpoint's state, Redis's memory, and each live worker with what it is doing."""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis.asyncio as aioredis
import redis.exceptions

from capi.constants import RedisKeys
from capi.queue import Queue

# A worker heartbeats every second; one silent this long is not counted as alive.
ALIVE_WITHIN_MS = 5_000


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


async def gather(client: aioredis.Redis, keys: RedisKeys) -> dict[str, Any]:
    """A snapshot of the queue, counters and key state, as JSON-ready data."""
    now = int(time.time() * 1000)
    queued, in_flight, oldest_ms, retries = await Queue(client, keys).depth()
    pipe = client.pipeline(transaction=False)
    pipe.zrange(keys.retry, 0, 0, withscores=True)
    pipe.hgetall(keys.stats)
    pipe.hgetall(keys.dl_reasons)
    pipe.hgetall(keys.key_state)
    pipe.zrangebyscore(keys.workers, now - ALIVE_WITHIN_MS, "+inf", withscores=True)
    pipe.hlen(keys.deadletters)
    pipe.hgetall(keys.worker_states)
    pipe.hgetall(keys.endpoint)
    next_retry, stats, reasons, key, workers, dl, states, endpoint = await pipe.execute()
    try:
        memory = await client.info("memory")
        role = str((await client.info("replication")).get("role", "master"))
    except redis.exceptions.ResponseError:  # INFO may be denied to capi's Redis user
        memory, role = {}, "unknown"
    used, limit = int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))
    policy = str(memory.get("maxmemory_policy", ""))
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
    ep = {k.decode(): v.decode() for k, v in endpoint.items()}
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
        "workers_alive": [w["name"] for w in live],
        "workers": live,
        "endpoint": {
            "state": "failing" if failing_since else "ok",
            "failing_since": _iso(failing_since),
            "last_error": ep.get("last_error") if failing_since else None,
            "last_error_at": _iso(int(ep.get("last_error_ms") or 0)),
            "last_ok_at": _iso(int(ep.get("last_ok_ms") or 0)),
        },
        "redis": {
            "used_memory": used,
            "maxmemory": limit,
            "maxmemory_policy": policy,
            "full": limit > 0 and used >= limit and policy == "noeviction",
            "role": role,
        },
    }
