"""The arq glue: ``arq workers.main.WorkerSettings`` runs capi's sender inside an arq worker.

arq gives the process its shape (signal handling, a health check key); the events
themselves never become arq jobs: they ride a Redis stream that :class:`capi.worker.sender.Sender`
reads in batches (see docs/how-it-works.md). ``capi worker`` runs the same sender
without arq's loop (:mod:`capi.worker.runner`). capi's scheduled work (status line, dead-letter
retention) runs in the worker's housekeeping, not as arq cron jobs, so every key arq
touches lives under ``CAPI_REDIS_PREFIX`` (``{p}:arq`` and ``{p}:arq:health``).

arq's own loop polls its job queue and writes its health key; its Redis pool here never
raises (a failed call is logged and answered with "nothing"), so Redis being away, full or
read-only never ends the worker through arq. Jobs arq would keep are JSON, never pickle.

``WorkerSettings`` is built on first access (PEP 562), so importing this module reads no
settings and opens no connection.

arq cannot run on a Redis Cluster (its job functions are multi-key transactions across
slots): with ``CAPI_REDIS_CLUSTER=true`` this module refuses to start with a ConfigError
that says so, and ``capi worker`` (the same sender, without arq) is the way.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import orjson
import redis.exceptions
from arq.connections import ArqRedis

from capi import destinations
from capi.errors import ConfigError
from capi.exitcodes import ExitCode
from capi.metrics import Metrics, serve
from capi.redisconn import connection_kwargs
from capi.settings import Settings
from capi.worker.runner import Fleet, configure_logging

log = logging.getLogger("capi.worker")


async def startup(ctx: dict[str, Any]) -> None:
    """Prove the key(s) can write events, then start the senders; refuse to start if the
    only destination's key is broken (see :mod:`capi.worker.runner`)."""
    settings: Settings = ctx.get("capi_settings") or Settings.load()
    metrics = Metrics()
    fleet = Fleet(settings, metrics)
    configure_logging(settings, fleet.api_keys())
    for warning in settings.unknown_variables(destinations.key_variables(settings)):
        log.warning("%s", warning)
    if settings.metrics_port is not None:  # before the key check: /readyz says what it waits for
        try:
            ctx["capi_http"] = serve(metrics, settings.metrics_port, settings.metrics_host)
        except ConfigError:  # the port is taken: say so in one line, close what is open
            fleet.stop()
            await fleet.aclose()
            raise
        log.info(
            "metrics and health on %s:%d (/metrics, /healthz, /readyz)",
            settings.metrics_host,
            settings.metrics_port,
        )
    try:
        await fleet.start()
    except BaseException:
        if ctx.get("capi_http") is not None:
            ctx.pop("capi_http").shutdown()
        raise
    ctx["capi_fleet"], ctx["capi_task"] = fleet, asyncio.create_task(fleet.run())


async def shutdown(ctx: dict[str, Any]) -> None:
    """Stop reading, let in-flight batches finish (or hand them back), close connections."""
    fleet: Fleet | None = ctx.get("capi_fleet")
    task: asyncio.Task[None] | None = ctx.get("capi_task")
    if fleet is None or task is None:
        return
    fleet.stop()
    await asyncio.gather(task, return_exceptions=True)
    if ctx.get("capi_http") is not None:
        ctx["capi_http"].shutdown()


async def noop(ctx: dict[str, Any]) -> None:
    """arq insists on one registered function; capi enqueues no arq jobs."""


class _QuietPool(ArqRedis):
    """arq's pool: a failed call is logged (once a minute) and answered with "nothing"."""

    _last_logged = 0.0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except redis.exceptions.RedisError as exc:
            now = time.monotonic()
            if now - self._last_logged > 60:
                type(self)._last_logged = now
                log.warning("arq's poll of Redis failed (%s); the sender carries on", exc)
            return _NOTHING.get(str(args[0]).upper())


_NOTHING: dict[str, Any] = {"ZRANGEBYSCORE": [], "ZCARD": 0}


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def worker_settings(settings: Settings | None = None, **ctx: Any) -> dict[str, Any]:
    """The arq worker settings for capi (as a dict, which arq accepts)."""
    settings = settings or Settings.load()
    if settings.redis_cluster:
        raise ConfigError(
            "arq cannot run on a Redis Cluster (CAPI_REDIS_CLUSTER=true): its jobs are "
            "transactions over keys of several slots. Run `capi worker` instead: the same "
            "sender, without arq."
        )
    queue_name = f"{settings.redis_prefix}:arq"
    # With sentinels, arq's pool is capi's own sentinel-managed pool (it follows failovers).
    where: dict[str, Any] = (
        {"pool_or_conn": settings.async_redis().connection_pool}
        if settings.sentinels is not None
        else connection_kwargs(settings.redis_url, settings.redis_timeout_s)
    )
    pool = _QuietPool(
        **where,
        job_serializer=_dumps,
        job_deserializer=orjson.loads,
        default_queue_name=queue_name,
    )
    return {
        "redis_pool": pool,
        "queue_name": queue_name,
        "health_check_key": f"{settings.redis_prefix}:arq:health",
        "health_check_interval": 60,
        "functions": [noop],
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
            destinations.load(settings)  # every key's presence and shape, before arq starts
            return worker_settings(settings)
        except ConfigError as exc:  # arq's CLI would print a traceback: one line instead
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(ExitCode.CONFIG) from None
    raise AttributeError(name)
