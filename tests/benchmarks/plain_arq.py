"""The naive sender the benchmark compares against: one arq job per event, one POST per job.

Given every advantage arq allows: a shared ``httpx.AsyncClient``, JSON serialization,
``poll_delay`` lowered, results not kept, ``max_jobs`` high enough to overlap requests.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import orjson
from arq.connections import RedisSettings

from capi.client import build_body

QUEUE = "bench:plain-arq"


async def startup(ctx: dict[str, Any]) -> None:
    ctx["http"] = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=10, max_keepalive_connections=10)
    )
    ctx["url"] = os.environ["CAPI_BASE_URL"] + "/v1/events"
    ctx["headers"] = {
        "Authorization": f"Bearer {os.environ['CAPI_API_KEY']}",
        "Content-Type": "application/json",
    }
    ctx["pid"] = os.environ["CAPI_PIXEL_ID"]


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["http"].aclose()


async def send_one(ctx: dict[str, Any], event: str) -> None:
    resp = await ctx["http"].post(
        ctx["url"],
        params={"pid": ctx["pid"]},
        content=build_body([event.encode()]),
        headers=ctx["headers"],
    )
    resp.raise_for_status()


def _settings() -> dict[str, Any]:
    return {
        "functions": [send_one],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": RedisSettings.from_dsn(os.environ["CAPI_REDIS_URL"]),
        "queue_name": QUEUE,
        "job_serializer": orjson.dumps,
        "job_deserializer": orjson.loads,
        "keep_result": 0,
        "max_jobs": 10,
        "poll_delay": 0.01,
    }


def __getattr__(name: str) -> Any:
    if name == "WorkerSettings":
        return _settings()
    raise AttributeError(name)
