"""What ``capi status`` shows: queue depth and age, in flight, retries, counters, key state."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from capi.constants import CONSUMER_GROUP, RedisKeys


async def gather(client: aioredis.Redis, keys: RedisKeys) -> dict[str, Any]:
    """A snapshot of the queue, counters and key state, as JSON-ready data."""
    now = int(time.time() * 1000)
    pipe = client.pipeline(transaction=False)
    pipe.xlen(keys.stream)
    pipe.xrange(keys.stream, count=1)
    pipe.zcard(keys.retry)
    pipe.zrange(keys.retry, 0, 0, withscores=True)
    pipe.hgetall(keys.stats)
    pipe.hgetall(keys.dl_reasons)
    pipe.hgetall(keys.key_state)
    pipe.zrangebyscore(keys.workers, now - 30_000, "+inf")
    pipe.hlen(keys.deadletters)
    xlen, first, retries, next_retry, stats, reasons, key, workers, dl = await pipe.execute()
    in_flight = 0
    try:
        pending = await client.xpending(keys.stream, CONSUMER_GROUP)
        in_flight = int(pending["pending"])
    except redis.exceptions.ResponseError:
        pass
    oldest_ms = int(first[0][0].split(b"-")[0]) if first else None
    return {
        "queued": int(xlen) - in_flight,
        "in_flight": in_flight,
        "oldest_queued_age_s": round((now - oldest_ms) / 1000, 3) if oldest_ms else None,
        "retry_batches_scheduled": int(retries),
        "next_retry_in_s": round((next_retry[0][1] - now) / 1000, 3) if next_retry else None,
        "counters": {k.decode(): int(v) for k, v in stats.items()},
        "dead_letters": int(dl),
        "dead_letters_by_reason": {k.decode(): int(v) for k, v in reasons.items()},
        "key": {k.decode(): v.decode() for k, v in key.items()} or {"state": "unknown"},
        "workers_alive": [w.decode() for w in workers],
    }
