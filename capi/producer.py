"""Enqueue events from a backend service: validated and hashed before they touch Redis.

:class:`Producer` (asyncio: FastAPI, aiohttp) and :class:`SyncProducer` (Django, Flask,
scripts) share one core: :func:`capi.events.prepare` refuses a bad event with
:class:`~capi.errors.EventRejected` naming each field and rule, and one Lua script adds
the event to the stream unless its dedup marker (name + id) already exists. Bulk enqueue
sends up to ``chunk`` events per script call. Nothing in Redis is pickled: the event is the
API's own JSON, and raw identifiers never reach it.

::

    async with Producer.from_settings(Settings.load()) as producer:
        await producer.enqueue(signup("user-42", email="ada@example.com",
                                      source_url="https://example.com/welcome"))
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

import redis
import redis.asyncio as aioredis

from capi.constants import RedisKeys
from capi.errors import EventRejected
from capi.events import Clock, PreparedEvent, prepare
from capi.queue import ENQUEUE_LUA
from capi.schema import Event
from capi.settings import Settings

RawEvent = Mapping[str, Any] | Event


@dataclass
class EnqueueReport:
    """What a bulk enqueue did: how many were queued, duplicates, and each refusal."""

    queued: int = 0
    duplicates: int = 0
    refused: list[tuple[int, EventRejected]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no event was refused."""
        return not self.refused


class _Core:
    """What both producers share: validation, and building the enqueue script's arguments."""

    def __init__(self, keys: RedisKeys, dedup_window_s: int, clock: Clock) -> None:
        self.keys = keys
        self.dedup_window_s = dedup_window_s
        self.clock = clock

    def prepare_all(self, events: Iterable[RawEvent], report: EnqueueReport) -> list[PreparedEvent]:
        prepared = []
        for i, raw in enumerate(events):
            try:
                prepared.append(prepare(raw, clock=self.clock))
            except EventRejected as exc:
                report.refused.append((i, exc))
        return prepared

    def script_args(self, batch: list[PreparedEvent]) -> tuple[list[str], list[Any]]:
        keys = [self.keys.stream, self.keys.stats]
        keys += [self.keys.dedup(p.name, p.id) for p in batch]
        args: list[Any] = [self.dedup_window_s]
        for p in batch:
            args += [p.id, p.timestamp_ms, p.json]
        return keys, args

    @staticmethod
    def count(report: EnqueueReport, flags: list[int]) -> None:
        queued = sum(int(f) for f in flags)
        report.queued += queued
        report.duplicates += len(flags) - queued


class Producer:
    """Validates, hashes and enqueues events (asyncio)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        keys: RedisKeys | None = None,
        dedup_window_s: int = 86_400,
        clock: Clock = time.time,
        chunk: int = 500,
    ) -> None:
        self.redis = client
        self._core = _Core(keys or RedisKeys(), dedup_window_s, clock)
        self._script = client.register_script(ENQUEUE_LUA)
        self.chunk = chunk

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Producer:
        """A producer for the Redis and prefix in ``settings``."""
        client = aioredis.Redis.from_url(settings.redis_url)
        return cls(client, keys=settings.keys, dedup_window_s=settings.dedup_window_s, **kwargs)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the Redis connection pool."""
        await self.redis.aclose()

    async def enqueue(self, event: RawEvent) -> bool:
        """Enqueue one event; False if its id was already enqueued within the dedup window.

        Raises :class:`~capi.errors.EventRejected` if the event breaks a rule.
        """
        prepared = prepare(event, clock=self._core.clock)
        keys, args = self._core.script_args([prepared])
        flags = await self._script(keys=keys, args=args)
        return bool(flags[0])

    async def enqueue_many(self, events: Iterable[RawEvent]) -> EnqueueReport:
        """Enqueue many events; refused ones are reported (by position), the rest queued."""
        report = EnqueueReport()
        prepared = self._core.prepare_all(events, report)
        for start in range(0, len(prepared), self.chunk):
            keys, args = self._core.script_args(prepared[start : start + self.chunk])
            self._core.count(report, await self._script(keys=keys, args=args))
        return report


class SyncProducer:
    """Validates, hashes and enqueues events (blocking; for Django, Flask and scripts)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        keys: RedisKeys | None = None,
        dedup_window_s: int = 86_400,
        clock: Clock = time.time,
        chunk: int = 500,
    ) -> None:
        self.redis = client
        self._core = _Core(keys or RedisKeys(), dedup_window_s, clock)
        self._script = client.register_script(ENQUEUE_LUA)
        self.chunk = chunk

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> SyncProducer:
        """A producer for the Redis and prefix in ``settings``."""
        client = redis.Redis.from_url(settings.redis_url)
        return cls(client, keys=settings.keys, dedup_window_s=settings.dedup_window_s, **kwargs)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the Redis connection pool."""
        self.redis.close()

    def enqueue(self, event: RawEvent) -> bool:
        """Enqueue one event; False if its id was already enqueued within the dedup window."""
        prepared = prepare(event, clock=self._core.clock)
        keys, args = self._core.script_args([prepared])
        return bool(self._script(keys=keys, args=args)[0])

    def enqueue_many(self, events: Iterable[RawEvent]) -> EnqueueReport:
        """Enqueue many events; refused ones are reported (by position), the rest queued."""
        report = EnqueueReport()
        prepared = self._core.prepare_all(events, report)
        for start in range(0, len(prepared), self.chunk):
            keys, args = self._core.script_args(prepared[start : start + self.chunk])
            self._core.count(report, self._script(keys=keys, args=args))
        return report
