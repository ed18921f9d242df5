"""Running a worker: the startup key check, the sender, signals, metrics, shutdown.

``capi worker`` calls :func:`run_worker`, which owns the process: it stops gracefully on
SIGTERM or SIGINT and otherwise runs until stopped, whatever Redis or the endpoint do
(see :mod:`capi.sender`). ``arq workers.main.WorkerSettings`` runs the same sender from
arq's startup hook, through :func:`start_sender`.

The startup check refuses to start only on a confirmed key or pixel problem (exit 10-13,
:class:`~capi.errors.KeyCheckFailed`). An endpoint that fails transiently (5xx, 429,
network) or a Redis that is away is waited out with backoff, and said so in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from http.server import ThreadingHTTPServer

import redis.exceptions

from capi import logs
from capi.errors import KeyCheckFailed
from capi.metrics import Metrics, serve
from capi.sender import Sender
from capi.settings import Settings

log = logging.getLogger("capi.worker")

CHECK_BACKOFF_FIRST_S = 1.0
CHECK_BACKOFF_CAP_S = 30.0


def configure_logging(settings: Settings) -> None:
    """The worker's log lines, as the settings ask, with the key redacted."""
    api_key, _ = settings.credentials()
    logs.configure(
        json=settings.log_format == "json",
        level=getattr(logging, settings.log_level.upper()),
        key=api_key,
    )


async def start_sender(
    settings: Settings, metrics: Metrics, *, stopping: asyncio.Event | None = None
) -> Sender | None:
    """A sender whose key passed the startup check; None if a stop came first.

    Raises :class:`KeyCheckFailed` when the key or pixel is confirmed broken.
    """
    sender = Sender.from_settings(settings, metrics=metrics)
    stop = stopping or asyncio.Event()
    wait_s = CHECK_BACKOFF_FIRST_S
    while not stop.is_set():
        try:
            result = await sender.guard.check()
        except redis.exceptions.RedisError as exc:
            delay = sender.trouble.failed(exc, "the startup key check")
        else:
            sender.trouble.ok()
            if result.ok:
                log.info("key %s can write events; sender starting", result.key_fingerprint)
                metrics.key_ok.set(1)
                return sender
            assert result.error is not None and result.diagnosis is not None
            if not result.error.retryable:
                await sender.aclose()
                raise KeyCheckFailed(result.diagnosis.text, result.error)
            delay, wait_s = wait_s, min(wait_s * 2, CHECK_BACKOFF_CAP_S)
            log.warning(
                "the startup key check could not get an answer about the key (%s); "
                "trying again in %.0f s; queued events stay queued meanwhile",
                result.error,
                delay,
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
    await sender.aclose()
    return None


async def run(settings: Settings, *, burst: bool = False) -> None:
    """Check the key, then send until SIGTERM/SIGINT (or, with ``burst``, until drained)."""
    metrics = Metrics()
    http: ThreadingHTTPServer | None = None
    if settings.metrics_port is not None:
        http = serve(metrics, settings.metrics_port, settings.metrics_host)
        log.info(
            "metrics and health on %s:%d (/metrics, /healthz, /readyz)",
            settings.metrics_host,
            settings.metrics_port,
        )
    stopping = asyncio.Event()
    holder: list[Sender] = []

    def on_signal(signum: signal.Signals) -> None:
        log.info("%s: stopping; in-flight batches finish, the rest stays queued", signum.name)
        stopping.set()
        for sender in holder:
            sender.stop()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        sender = await start_sender(settings, metrics, stopping=stopping)
        if sender is None:
            return
        holder.append(sender)
        try:
            await sender.run(burst=burst)
        finally:
            await sender.aclose()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if http is not None:
            http.shutdown()


def run_worker(settings: Settings, *, burst: bool = False) -> None:
    """Run a worker process until stopped; raise KeyCheckFailed if the key is broken."""
    configure_logging(settings)
    asyncio.run(run(settings, burst=burst))
