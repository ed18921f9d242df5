"""Forgetting a stopped worker's consumers never takes entries away with them."""

from __future__ import annotations

import asyncio
from typing import Any

from capi import clock
from capi.constants import CONSUMER_GROUP
from capi.queue import Entry, Queue
from capi.sandbox import SandboxThread
from tests.helpers import enqueue, events, make_settings


def test_a_consumer_that_reads_while_it_is_forgotten_keeps_what_it_read(
    redis_url: str, sandbox: SandboxThread
) -> None:
    """After a Redis freeze longer than LIVENESS_S every worker looks stopped to the others.
    At the thaw one's housekeeping saw a consumer of another holding nothing (XINFO
    CONSUMERS), that consumer's read (sent during the freeze) was served, and then the
    housekeeping dropped the consumer (XGROUP DELCONSUMER), with the batch it had just read:
    those entries left the pending list, the retry that followed a 403 acknowledged none,
    so scheduled none, and deleted them. Soak: 100 events lost after a freeze."""
    settings = make_settings(sandbox, redis_url)
    enqueue(settings, events(3))

    async def race() -> int:
        client = settings.async_redis()
        other = settings.async_redis()
        queue, reader = Queue(client, settings.keys), Queue(other, settings.keys)
        await queue.ensure_group()
        await client.xgroup_createconsumer(settings.keys.stream, CONSUMER_GROUP, "w1:0")
        read: list[Entry] = []
        real = client.xinfo_consumers

        async def looked_then_read(*args: Any, **kwargs: Any) -> Any:
            seen = await real(*args, **kwargs)  # w1:0 holds nothing yet
            read.extend(await reader.read("w1:0", 3))  # its read is served now
            return seen

        client.xinfo_consumers = looked_then_read  # type: ignore[method-assign]
        await asyncio.sleep(0.01)  # idle for longer than silent_ms: the consumer of a silent worker
        await queue.forget_stopped(clock.now_ms(), 10**9, live={"w2"}, silent_ms=0)
        assert len(read) == 3
        # The worker that read them meets a 403 and schedules a retry; it comes due.
        await reader.schedule_retry(read, clock.now_ms(), {"reason": "x"}, clock.now_ms())
        moved = await queue.move_due_retries("+inf")
        await client.aclose()
        await other.aclose()
        return moved

    assert asyncio.run(race()) == 3  # the three events go back on the stream, none lost
