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

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

import redis
import redis.asyncio as aioredis
import redis.exceptions

from capi.constants import RedisKeys
from capi.errors import EventRejected, QueueUnavailable
from capi.events import Clock, PreparedEvent, prepare
from capi.queue import ENQUEUE_LUA
from capi.schema import Event
from capi.settings import Settings

RawEvent = Mapping[str, Any] | Event
log = logging.getLogger("capi.producer")


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


@contextlib.contextmanager
def _translated(client: Any) -> Iterator[None]:
    """Turn Redis being away into QueueUnavailable (events of a failed call are not queued;
    a bulk call may have queued earlier chunks: enqueue them again, the dedup makes it safe)."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        where = client.connection_pool.connection_kwargs.get("host", "?")
        raise QueueUnavailable(
            f"Redis at {where} could not be reached ({exc}); the event was not queued. "
            "Check CAPI_REDIS_URL; enqueueing again is safe (the event id dedups)."
        ) from exc


class _BaseProducer:
    """What both producers share: settings, validation, and the enqueue script's arguments."""

    def __init__(
        self,
        client: Any,
        *,
        keys: RedisKeys | None = None,
        dedup_window_s: int = 86_400,
        clock: Clock = time.time,
        chunk: int = 500,
    ) -> None:
        self.redis = client
        self.keys = keys or RedisKeys()
        self.dedup_window_s = dedup_window_s
        self.clock = clock
        self.chunk = chunk
        self._script = client.register_script(ENQUEUE_LUA)

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Self:
        """A producer for the Redis and prefix in ``settings`` (logs a warning when that is
        the default Redis because CAPI_REDIS_URL is not set)."""
        if "redis_url" not in settings.model_fields_set:
            log.warning(
                "capi: CAPI_REDIS_URL is not set; enqueueing to the default Redis at %s",
                settings.redis_url,
            )
        return cls(
            cls._connect(settings.redis_url),
            keys=settings.keys,
            dedup_window_s=settings.dedup_window_s,
            **kwargs,
        )

    @staticmethod
    def _connect(url: str) -> Any:
        raise NotImplementedError

    def _one(self, event: RawEvent) -> tuple[list[str], list[Any]]:
        return self._args([prepare(event, clock=self.clock)])

    def _chunks(
        self, events: Iterable[RawEvent], report: EnqueueReport
    ) -> Iterator[tuple[list[str], list[Any]]]:
        prepared = []
        for i, raw in enumerate(events):
            try:
                prepared.append(prepare(raw, clock=self.clock))
            except EventRejected as exc:
                report.refused.append((i, exc))
        for start in range(0, len(prepared), self.chunk):
            yield self._args(prepared[start : start + self.chunk])

    def _args(self, batch: list[PreparedEvent]) -> tuple[list[str], list[Any]]:
        keys = [self.keys.stream, self.keys.stats]
        keys += [self.keys.dedup(p.name, p.id) for p in batch]
        args: list[Any] = [self.dedup_window_s]
        for p in batch:
            args += [p.id, p.timestamp_ms, p.json]
        return keys, args

    @staticmethod
    def _count(report: EnqueueReport, flags: list[int]) -> None:
        queued = sum(int(f) for f in flags)
        report.queued += queued
        report.duplicates += len(flags) - queued


class Producer(_BaseProducer):
    """Validates, hashes and enqueues events (asyncio)."""

    @staticmethod
    def _connect(url: str) -> aioredis.Redis:
        client: aioredis.Redis = aioredis.Redis.from_url(url)
        return client

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
        keys, args = self._one(event)
        with _translated(self.redis):
            return bool((await self._script(keys=keys, args=args))[0])

    async def enqueue_many(self, events: Iterable[RawEvent]) -> EnqueueReport:
        """Enqueue many events; refused ones are reported (by position), the rest queued."""
        report = EnqueueReport()
        with _translated(self.redis):
            for keys, args in self._chunks(events, report):
                self._count(report, await self._script(keys=keys, args=args))
        return report


class SyncProducer(_BaseProducer):
    """Validates, hashes and enqueues events (blocking; for Django, Flask and scripts)."""

    @staticmethod
    def _connect(url: str) -> redis.Redis:
        return redis.Redis.from_url(url)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the Redis connection pool."""
        self.redis.close()

    def enqueue(self, event: RawEvent) -> bool:
        """Enqueue one event; False if its id was already enqueued within the dedup window."""
        keys, args = self._one(event)
        with _translated(self.redis):
            return bool(self._script(keys=keys, args=args)[0])

    def enqueue_many(self, events: Iterable[RawEvent]) -> EnqueueReport:
        """Enqueue many events; refused ones are reported (by position), the rest queued."""
        report = EnqueueReport()
        with _translated(self.redis):
            for keys, args in self._chunks(events, report):
                self._count(report, self._script(keys=keys, args=args))
        return report
