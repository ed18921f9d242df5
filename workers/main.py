"""The arq worker that hosts capi's sender: ``arq workers.main.WorkerSettings`` or ``capi worker``.

arq gives the process its shape (signal handling, health check key, cron); the events
themselves never become arq jobs: they ride a Redis stream that :class:`capi.sender.Sender`
reads in batches (see README, "How it works"). Jobs arq does keep are JSON, never pickle.

``WorkerSettings`` is built on first access (PEP 562), so importing this module reads no
settings and opens no connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson
from arq.connections import RedisSettings
from arq.cron import cron

from capi.errors import KeyCheckFailed
from capi.sender import Sender
from capi.settings import Settings
from capi.status import gather

log = logging.getLogger("capi.worker")


async def startup(ctx: dict[str, Any]) -> None:
    """Prove the key can write events, then start the sender; refuse to start otherwise."""
    settings: Settings = ctx.get("capi_settings") or Settings.load()
    sender = Sender.from_settings(settings)
    result = await sender.guard.check()
    if not result.ok:
        await sender.aclose()
        assert result.error is not None and result.diagnosis is not None
        raise KeyCheckFailed(result.diagnosis.text, result.error)
    log.info("key %s can write events; sender starting", result.key_fingerprint)
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


async def log_status(ctx: dict[str, Any]) -> None:
    """Log queue depth and counters once a minute."""
    sender: Sender | None = ctx.get("capi_sender")
    if sender is not None:
        status = await gather(sender.redis, sender.settings.keys)
        log.info("status: %s", orjson.dumps(status).decode())


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def worker_settings(settings: Settings | None = None, **ctx: Any) -> dict[str, Any]:
    """The arq worker settings for capi (as a dict, which arq accepts)."""
    settings = settings or Settings.load()
    return {
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "queue_name": f"{settings.redis_prefix}:arq",
        "health_check_key": f"{settings.redis_prefix}:arq:health",
        "functions": [],
        "cron_jobs": [cron(log_status, second=0, keep_result=0, run_at_startup=False)],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "job_serializer": _dumps,
        "job_deserializer": orjson.loads,
        "keep_result": 0,
        "ctx": {"capi_settings": settings, **ctx},
    }


def __getattr__(name: str) -> Any:
    if name == "WorkerSettings":
        return worker_settings()
    raise AttributeError(name)
