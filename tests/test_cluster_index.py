"""The shared index in its cluster form (capi.index), every queue script in its cluster
twin: run against one Redis (which takes any keys), so each script and each step of the
index's order is checked fast, without a cluster."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from capi import coverage, dedup, index
from capi.constants import RedisKeys
from capi.events import prepare
from capi.queue import ENQUEUE_LUA, Queue, enqueue_call, lua
from tests.helpers import events
from tests.redisproc import RedisProcess

KEYS = RedisKeys("capi", "shop", cluster=True)


async def enqueue(client: aioredis.Redis, evts: list[dict[str, Any]]) -> bool:
    """Run the enqueue script alone (no index step); whether it set the flag."""
    rows = []
    for event in evts:
        p = prepare(event)
        digest = dedup.digest(f"{p.name}:{p.id}")
        rows.append((digest, p.id, p.timestamp_ms, p.json, coverage.mask(p.event)))
    keys, args = enqueue_call(KEYS, 3600, rows)
    answer = await client.register_script(lua(KEYS, ENQUEUE_LUA))(keys=keys, args=args)
    return index.unpack(KEYS, answer)[1]


def test_each_script_keeps_the_index_in_its_cluster_form(redis_url: str) -> None:
    async def go() -> None:
        client = aioredis.from_url(redis_url)
        queue = Queue(client, KEYS)
        await queue.ensure_group()
        assert await enqueue(client, events(3))  # the first write sets the flag
        assert not await enqueue(client, events(2, start=3))  # the next ones do not
        assert not await client.smembers(KEYS.active)  # the scripts never touch the index
        await index.arm(client, KEYS, ["shop"])
        assert await client.smembers(KEYS.active) == {b"shop"}
        assert await client.xlen(KEYS.wake) == 1
        entries = await queue.read("w:0", 10)
        assert len(entries) == 5

        await queue.schedule_retry(entries[:2], 4_000_000_000_000, {"e": 1}, 1000)
        await queue.schedule_retry(entries[2:3], 3_000_000_000_000, {"e": 1}, 1000)
        assert await client.zscore(KEYS.retry_due, "shop") == 3_000_000_000_000
        await queue.hand_back(entries[3:])
        assert await queue.move_due_retries(3_000_000_000_000) == 1
        assert await client.zscore(KEYS.retry_due, "shop") == 4_000_000_000_000
        assert await queue.release_retries() == 2
        assert await client.zscore(KEYS.retry_due, "shop") is None
        again = await queue.read("w:0", 10)
        assert len(again) == 5
        await queue.schedule_retry(again[:1], 5_000_000_000_000, {"e": 1}, 1000)
        await client.delete(KEYS.retry_due)  # a caller killed before its ZADD
        await queue.index_retries()
        assert await client.zscore(KEYS.retry_due, "shop") == 5_000_000_000_000
        assert await queue.purge(3600) == (0, 1)  # the rest are in flight
        assert await client.zscore(KEYS.retry_due, "shop") is None

        assert await queue.read("w:0", 10) == []  # empty: out of the set, flag cleared
        assert not await client.exists(KEYS.armed)
        assert not await client.smembers(KEYS.active)
        await client.aclose()

    asyncio.run(go())


def test_a_read_that_finds_entries_after_leaving_the_set_puts_the_destination_back(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's order: leave the set, then read in the destination's slot. An entry
    written between the two (its writer finds the flag set, so adds nothing to the set)
    is found by that read, and the worker puts the destination back. The write is made
    at that very point, by wrapping the first step."""

    async def go() -> None:
        client = aioredis.from_url(redis_url)
        queue = Queue(client, KEYS)
        await queue.ensure_group()
        await enqueue(client, events(1))
        await index.arm(client, KEYS, ["shop"])
        assert len(await queue.read("w:0", 10)) == 1
        leave = index.before_empty_read

        async def leave_then_write(c: aioredis.Redis, keys: RedisKeys) -> None:
            await leave(c, keys)
            assert not await client.smembers(KEYS.active)
            assert not await enqueue(client, events(1, start=1))  # flag set: no SADD

        monkeypatch.setattr(index, "before_empty_read", leave_then_write)
        assert len(await queue.read("w:0", 10)) == 1
        assert await client.exists(KEYS.armed)
        assert await client.smembers(KEYS.active) == {b"shop"}
        await client.aclose()

    asyncio.run(go())


async def _sweep(client: aioredis.Redis) -> list[str]:
    return await index.sweep(client, [KEYS, KEYS.for_destination("idle")])


def test_the_sweep_puts_back_what_a_killed_writer_left_out(redis_url: str) -> None:
    async def go() -> None:
        client = aioredis.from_url(redis_url)
        await Queue(client, KEYS).ensure_group()
        assert await enqueue(client, events(1))  # flag set, the writer killed before SADD
        assert await _sweep(client) == ["shop"]
        assert await client.smembers(KEYS.active) == {b"shop"}
        assert await client.xlen(KEYS.wake) == 1
        assert await _sweep(client) == ["shop"]
        assert await client.xlen(KEYS.wake) == 1  # already there: no second wake-up
        await client.aclose()

    asyncio.run(go())


def test_retries_are_indexed_and_moved_back_while_the_index_shard_is_full(
    tmp_path: Path,
) -> None:
    """The index lives on one shard; when that shard was full (maxmemory under noeviction)
    the retry-due index's ZADD was refused, so retries scheduled then, on every shard, were
    never moved back until it was not (in the fault campaign: 1,200 events of 12
    destinations held for as long as it lasted, the worker "waiting for Redis"). The retry
    scripts may exceed maxmemory (they free stream entries); so does their index step."""

    async def go(url: str) -> None:
        client = aioredis.from_url(url)
        queue = Queue(client, KEYS)
        await queue.ensure_group()
        await enqueue(client, events(3))
        entries = await queue.read("w:0", 10)
        await client.config_set("maxmemory", 1)  # full from now on
        await queue.schedule_retry(entries, 1000, {"e": 1}, 1000)
        assert await client.zscore(KEYS.retry_due, "shop") == 1000
        await client.delete(KEYS.retry_due)  # a writer killed before its index step
        await index.sweep(client, [KEYS])
        assert await client.zscore(KEYS.retry_due, "shop") == 1000
        assert await queue.move_due_retries(2000) == 3
        assert len(await queue.read("w:0", 10)) == 3
        await client.aclose()

    with RedisProcess(tmp_path) as server:
        asyncio.run(go(server.url))
