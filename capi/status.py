"""What ``capi status`` shows: queue depth and age, in flight, retries, counters, key state."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from capi.constants import RedisKeys
from capi.queue import Queue


async def gather(client: aioredis.Redis, keys: RedisKeys) -> dict[str, Any]:
    """A snapshot of the queue, counters and key state, as JSON-ready data."""
    now = int(time.time() * 1000)
    queued, in_flight, oldest_ms, retries = await Queue(client, keys).depth()
    pipe = client.pipeline(transaction=False)
    pipe.zrange(keys.retry, 0, 0, withscores=True)
    pipe.hgetall(keys.stats)
    pipe.hgetall(keys.dl_reasons)
    pipe.hgetall(keys.key_state)
    pipe.zrangebyscore(keys.workers, now - 30_000, "+inf")
    pipe.hlen(keys.deadletters)
    next_retry, stats, reasons, key, workers, dl = await pipe.execute()
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
        "workers_alive": [w.decode() for w in workers],
    }
