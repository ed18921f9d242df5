"""What a worker rides out: Redis being away, full, read-only, or erroring in any other way.

A worker never stops on such an error. :class:`Trouble` names the kind of trouble, logs it
once when it starts (with its cause), reminds every minute while it lasts, logs once when
it ends, and tells the caller how long to wait before trying again (capped, jittered
exponential backoff). Each outage is said, however soon after the last (a failure after
``NEW_OUTAGE_AFTER_S`` without any starts a new one); a flapping error within one outage
is not said on every flap. The worker's state line (``capi status``) and metrics read it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import redis.exceptions

from capi.redisconn import brief

REMIND_EVERY_S = 60.0
BACKOFF_FIRST_S = 0.1
BACKOFF_CAP_S = 5.0
# While trouble lasts, callers fail at least every BACKOFF_CAP_S (their retries are capped
# there): a failure after a longer quiet spell starts a new outage, said anew.
NEW_OUTAGE_AFTER_S = BACKOFF_CAP_S + 1.0

# Redis's error prefixes, and what each means for an operator.
_RESPONSES = {
    "OOM": ("full", "Redis is full (maxmemory reached under noeviction)"),
    "READONLY": ("read-only", "Redis is read-only (a replica, or a failover in progress)"),
    "MISCONF": ("cannot-persist", "Redis refuses writes: it cannot persist (MISCONF)"),
    "NOPERM": ("no-permission", "the Redis user lacks a permission (NOPERM)"),
    "NOGROUP": ("lost-group", "Redis lost the consumer group (restart without persistence?)"),
    "LOADING": ("loading", "Redis is loading its data set"),
    "BUSY": ("busy", "Redis is busy running a script"),
    "MASTERDOWN": ("master-down", "the Redis replica lost its master"),
    "UNBLOCKED": ("unblocked", "Redis ended a blocked read: it became a replica (a failover)"),
    "CLUSTERDOWN": ("cluster-down", "the Redis Cluster is down (a failover in progress?)"),
    "MOVED": ("cluster-moved", "a Redis Cluster slot moved (a failover or resharding)"),
    "TRYAGAIN": ("cluster-moved", "a Redis Cluster slot is being moved (resharding)"),
}


# redis-py turns these prefixes into classes and drops the prefix from the message.
_CLASSES: tuple[tuple[type[Exception], str], ...] = (
    (redis.exceptions.OutOfMemoryError, "OOM"),
    (redis.exceptions.ReadOnlyError, "READONLY"),
    (redis.exceptions.NoPermissionError, "NOPERM"),
    (redis.exceptions.BusyLoadingError, "LOADING"),
    (redis.exceptions.ClusterDownError, "CLUSTERDOWN"),
    (redis.exceptions.MovedError, "MOVED"),
    (redis.exceptions.TryAgainError, "TRYAGAIN"),
)


def classify(exc: BaseException) -> tuple[str, str]:
    """The kind of a worker's error (``unreachable``, ``full``, ...) and its meaning."""
    for cls, prefix in _CLASSES:
        if isinstance(exc, cls):
            return _RESPONSES[prefix]
    if isinstance(exc, redis.exceptions.AuthenticationError):
        return "auth", "Redis refused the credentials in CAPI_REDIS_URL"
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return "unreachable", "Redis cannot be reached or did not answer in time"
    if isinstance(exc, redis.exceptions.RedisError):
        text = str(exc)
        for prefix, kind in _RESPONSES.items():
            if text.startswith(prefix) or f" {prefix} " in f" {text} ":
                return kind
        return "redis-error", "Redis answered with an error"
    return "unexpected", "an unexpected error"


class Trouble:
    """Logs each of a worker's outages once per kind (reminding every minute while one
    lasts) and paces its retries."""

    def __init__(
        self,
        log: logging.Logger,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.log = log
        self._monotonic = monotonic
        self._rand = rand
        self.kind: str | None = None
        self.meaning = ""
        self.cause = ""
        self.since = 0.0
        self.last_ok = monotonic()
        self._failures = 0
        self._logged: dict[str, float] = {}
        self._last_failed = float("-inf")

    @property
    def redis_ok(self) -> bool:
        """Whether the last Redis call worked (an unexpected error elsewhere is not Redis's)."""
        return self.kind is None or self.kind == "unexpected"

    def failed(self, exc: BaseException, where: str) -> float:
        """Record a failure; log it if it is news; return how long to wait before retrying."""
        kind, meaning = classify(exc)
        now = self._monotonic()
        if now - self._last_failed >= NEW_OUTAGE_AFTER_S:
            self._logged.clear()  # a new outage: its start is said, however soon after the last
        self._last_failed = now
        if kind != self.kind:
            self.since = now
        self.kind, self.meaning, self.cause = kind, meaning, f"{type(exc).__name__}: {brief(exc)}"
        self._failures += 1
        last = self._logged.get(kind)
        if last is None or now - last >= REMIND_EVERY_S:
            self._logged[kind] = now
            lasting = f" for {now - self.since:.0f} s" if now - self.since >= 1 else ""
            message = (
                "%s%s (%s, in %s); the worker tries again and loses nothing (capi worker "
                "--burst gives up once Redis is silent for CAPI_REDIS_TIMEOUT_S)"
            )
            args = (meaning, lasting, self.cause[:300], where)
            if kind == "unexpected":
                self.log.error(message, *args, exc_info=exc)
            else:
                self.log.error(message, *args)
        ceiling = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** min(self._failures - 1, 20))
        return float(ceiling / 2 + ceiling / 2 * self._rand())

    def now(self) -> float:
        """The time to give :meth:`ok` as ``sent``, taken before a call is sent."""
        return self._monotonic()

    def ok(self, *, sent: float | None = None) -> None:
        """Record that Redis answered; log the end of any trouble. ``sent``: when the call
        answered was sent (:meth:`now`). Lanes share one Trouble, so a call sent before
        another's failure may be answered after it: that says nothing of Redis now."""
        if sent is not None and sent < self._last_failed:
            return
        now = self._monotonic()
        self.last_ok = now
        if self.kind is not None:
            # Said once per episode that was said: a flapping error is not logged on every
            # flap (its start is reminded at most once a minute, see failed()).
            if self._logged.get(self.kind, float("-inf")) >= self.since:
                self.log.warning(
                    "recovered: %s no longer (after %.1f s); resuming",
                    self.meaning,
                    now - self.since,
                )
            self.kind = None
        self._failures = 0

    def describe(self) -> str:
        """One line for a status: what is wrong and since when, or ``ok``."""
        if self.kind is None:
            return "ok"
        return f"{self.meaning} for {self._monotonic() - self.since:.0f} s ({self.cause[:200]})"
