"""The worker's floor: what one process does to drain a stream with no validation and no
bookkeeping, for ``tests.benchmarks.bench`` to set beside one ``capi worker``.

The same Redis reads (XREADGROUP of ``CAPI_BATCH_SIZE`` new entries through a consumer
group), the same acknowledgement (XACK and XDEL of the batch, in one round trip, as the
worker's delivery script does), and the same HTTP POSTs (the body
:func:`capi.client.build_body` makes of the stored events, to the same endpoint with the
same headers, over the same httpx pool), ``CAPI_CONCURRENCY`` batches in flight. Nothing
else: no stale check, no fate, no stats, no coverage, no metrics, no logs.

    CAPI_REDIS_URL=... CAPI_BASE_URL=... .venv/bin/python -m tests.benchmarks.bare_drain
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import redis.asyncio as aioredis
import redis.exceptions

from capi.client import USER_AGENT, build_body, http_pool
from capi.constants import EVENTS_PATH
from capi.settings import Settings

GROUP = "bare"


async def lane(
    settings: Settings, client: aioredis.Redis, http: httpx.AsyncClient, name: str
) -> int:
    """Drain batches until a read finds none; the events sent."""
    stream = settings.keys.for_destination("default").stream
    url = settings.base_url.rstrip("/") + EVENTS_PATH
    key = settings.api_key.get_secret_value() if settings.api_key else ""
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }
    sent = 0
    while True:
        resp = await client.xreadgroup(GROUP, name, {stream: ">"}, count=settings.batch_size)
        if not resp or not resp[0][1]:
            return sent
        entries = resp[0][1]
        body = build_body([fields[b"e"] for _, fields in entries])
        answer = await http.post(
            url, params={"pid": settings.pixel_id}, content=body, headers=headers
        )
        answer.raise_for_status()
        ids = [sid for sid, _ in entries]
        async with client.pipeline(transaction=False) as pipe:
            pipe.xack(stream, GROUP, *ids)
            pipe.xdel(stream, *ids)
            await pipe.execute()
        sent += len(ids)


async def main() -> None:
    settings = Settings()
    client = settings.async_redis()
    stream = settings.keys.for_destination("default").stream
    with contextlib.suppress(redis.exceptions.ResponseError):  # the group exists
        await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    http = http_pool(settings.request_timeout_s)
    try:
        counts = await asyncio.gather(
            *(lane(settings, client, http, f"bare-{i}") for i in range(settings.concurrency))
        )
    finally:
        await http.aclose()
        await client.aclose()
    print(sum(counts))


if __name__ == "__main__":
    asyncio.run(main())
