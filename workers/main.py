"""The arq worker that hosts capi's sender: ``arq workers.main.WorkerSettings`` or ``capi worker``.

arq gives the process its shape (signal handling, health check key, cron); the events
themselves never become arq jobs: they ride a Redis stream that :class:`capi.sender.Sender`
reads in batches (see README, "How it works"). Jobs arq does keep are JSON, never pickle.

``WorkerSettings`` is built on first access (PEP 562), so importing this module reads no
settings and opens no connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
from arq.connections import RedisSettings
from arq.cron import cron

from capi import logs, replay
from capi.errors import ConfigError, KeyCheckFailed
from capi.exitcodes import ExitCode
from capi.metrics import Metrics, serve
from capi.sender import Sender
from capi.settings import Settings
from capi.status import gather

log = logging.getLogger("capi.worker")


async def startup(ctx: dict[str, Any]) -> None:
    """Prove the key can write events, then start the sender; refuse to start otherwise."""
    settings: Settings = ctx.get("capi_settings") or Settings.load()
    api_key, _ = settings.credentials()
    logs.configure(
        json=settings.log_format == "json",
        level=getattr(logging, settings.log_level.upper()),
        key=api_key,
    )
    metrics = Metrics()
    sender = Sender.from_settings(settings, metrics=metrics)
    result = await sender.guard.check()
    if not result.ok:
        await sender.aclose()
        assert result.error is not None and result.diagnosis is not None
        raise KeyCheckFailed(result.diagnosis.text, result.error)
    log.info("key %s can write events; sender starting", result.key_fingerprint)
    metrics.key_ok.set(1)
    if settings.metrics_port is not None:
        try:
            ctx["capi_http"] = serve(metrics, settings.metrics_port, settings.metrics_host)
        except ConfigError:  # the port is taken: say so in one line, close what is open
            await sender.aclose()
            raise
        log.info(
            "metrics and health on %s:%d (/metrics, /healthz, /readyz)",
            settings.metrics_host,
            settings.metrics_port,
        )
    task = asyncio.create_task(sender.run(burst=bool(ctx.get("capi_burst"))))
    on_done: Callable[[], None] | None = ctx.get("capi_on_done")
    if on_done is not None:
        task.add_done_callback(lambda _: on_done())
    ctx["capi_sender"], ctx["capi_task"] = sender, task


async def shutdown(ctx: dict[str, Any]) -> None:
    """Stop reading, let in-flight batches finish (or hand them back), close connections."""
    sender: Sender | None = ctx.get("capi_sender")
    task: asyncio.Task[None] | None = ctx.get("capi_task")
    if sender is None or task is None:
        return
    sender.stop()
    await asyncio.gather(task, return_exceptions=True)
    await sender.aclose()
    if ctx.get("capi_http") is not None:
        ctx["capi_http"].shutdown()


async def log_status(ctx: dict[str, Any]) -> None:
    """Log queue depth and counters once a minute."""
    sender: Sender | None = ctx.get("capi_sender")
    if sender is not None:
        status = await gather(sender.redis, sender.settings.keys)
        log.info("status: %s", orjson.dumps(status).decode())


async def prune_dead_letters(ctx: dict[str, Any]) -> None:
    """Hourly: warn about dead letters nearing their deadline or retention; prune the old."""
    sender: Sender | None = ctx.get("capi_sender")
    if sender is None:
        return
    now = int(time.time() * 1000)
    retention_ms = int(sender.settings.deadletter_retention_days * 86_400_000)
    records = await replay.select(sender.redis, sender.settings.keys, replay.Selection(), now)
    day = 86_400_000
    old = [r for r in records if r.dead_lettered_ms + retention_ms <= now]
    soon = [r for r in records if replay.can_replay(r, now) and r.replay_deadline_ms - now < day]
    if soon:
        log.warning(
            "%d dead letters pass their replay deadline within 24 h; replay or export them",
            len(soon),
            extra={"event_ids": [r.id for r in soon]},
        )
    if old:
        await replay.purge(sender.redis, sender.settings.keys, old)
        log.warning(
            "pruned %d dead letters older than CAPI_DEADLETTER_RETENTION_DAYS=%g",
            len(old),
            sender.settings.deadletter_retention_days,
            extra={"event_ids": [r.id for r in old], "count": len(old)},
        )


class _RedisSettings(RedisSettings):
    """arq's Redis settings, whose repr masks the password (arq's shows it)."""

    def __repr__(self) -> str:
        masked = dataclasses.replace(self, password="***" if self.password else None)
        return RedisSettings.__repr__(masked)


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def worker_settings(settings: Settings | None = None, **ctx: Any) -> dict[str, Any]:
    """The arq worker settings for capi (as a dict, which arq accepts)."""
    settings = settings or Settings.load()
    return {
        "redis_settings": _RedisSettings(**vars(RedisSettings.from_dsn(settings.redis_url))),
        "queue_name": f"{settings.redis_prefix}:arq",
        "health_check_key": f"{settings.redis_prefix}:arq:health",
        "functions": [],
        "cron_jobs": [
            cron(log_status, second=0, keep_result=0),
            cron(prune_dead_letters, minute=17, second=0, keep_result=0, run_at_startup=True),
        ],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "job_serializer": _dumps,
        "job_deserializer": orjson.loads,
        "keep_result": 0,
        "ctx": {"capi_settings": settings, **ctx},
    }


def __getattr__(name: str) -> Any:
    if name == "WorkerSettings":
        try:
            settings = Settings.load()
            settings.credentials()  # the key's presence and shape, before arq starts
            return worker_settings(settings)
        except ConfigError as exc:  # arq's CLI would print a traceback: one line instead
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(ExitCode.CONFIG) from None
    raise AttributeError(name)
