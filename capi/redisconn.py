"""Every Redis connection capi opens, from one parser of ``CAPI_REDIS_URL``.

The producers, the CLI, the worker and arq's own loop all get their clients here, so a
URL means the same thing everywhere (percent-encoded passwords, ``?ssl_ca_certs=``,
``redis://host:port/``), and every client has a bounded time per call:
``CAPI_REDIS_TIMEOUT_S`` for connecting and for each answer. A frozen Redis therefore
costs a caller at most that long (plus the worker's read block), never for ever.

The worker's clients answer the same way; the worker itself decides what to do when a
call fails (it waits and tries again, see :mod:`capi.worker.sender`).
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import parse_url

from capi.errors import ConfigError

# Query options that name files or TLS behaviour; redis-py's own parser keeps them as text.
_TLS_OPTIONS = {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_ca_path"}


def connection_kwargs(url: str, timeout_s: float) -> dict[str, Any]:
    """The keyword arguments of a Redis client for ``url``; ConfigError if it is malformed.

    ``rediss://`` verifies the server's certificate and host name unless the URL says
    otherwise (``?ssl_check_hostname=false``, ``?ssl_cert_reqs=none``); a private CA is
    named with ``?ssl_ca_certs=/path/to/ca.pem``.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
        kwargs: dict[str, Any] = dict(parse_url(url))
    except ValueError as exc:
        raise ConfigError(
            f"CAPI_REDIS_URL is malformed ({exc}); e.g. redis://host:6379/0"
        ) from None
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not (db.isdigit() and int(db) < 2**31):
        raise ConfigError(
            f"CAPI_REDIS_URL names database {db[:20]!r}: the database is a number, e.g. /0"
        )
    query = parse_qs(parts.query)
    kwargs.pop("connection_class", None)
    if parts.scheme == "unix":
        kwargs["unix_socket_path"] = kwargs.pop("path")
    if parts.scheme == "rediss":
        kwargs["ssl"] = True
        kwargs.setdefault("ssl_check_hostname", True)
        kwargs.setdefault("ssl_cert_reqs", "required")
    for name in _TLS_OPTIONS & set(query):
        kwargs[name] = query[name][-1]
    kwargs.setdefault("socket_timeout", timeout_s)
    kwargs.setdefault("socket_connect_timeout", timeout_s)
    if "unix_socket_path" not in kwargs:
        kwargs.setdefault("socket_keepalive", True)
    return kwargs


# A call whose connection dropped (Redis restarted, failed over, or killed the client) is
# sent once more on a fresh connection. Every call capi makes may run twice: enqueue and
# the fate scripts are idempotent, and a read whose answer was lost leaves entries that
# the worker's housekeeping takes back (capi.queue.Queue.reclaim). A timeout is not
# retried: a frozen Redis costs one timeout, not two.
_RETRY_ON = [redis.exceptions.ConnectionError]


# As many connections as callers want (redis-py's own default), each connected on its own.
_MAX_CONNECTIONS = 2**31


def async_client(url: str, timeout_s: float, **extra: Any) -> aioredis.Redis:
    """An asyncio client for ``url`` with bounded calls, each bounded on its own.

    redis-py's plain asyncio pool connects a new connection while it holds the pool's lock,
    so against a frozen Redis concurrent callers queued behind each other's connect (five
    callers failed after 1, 1, 2, 3 and 4 timeouts). Its BlockingConnectionPool connects
    outside the lock; with no practical limit on connections it never blocks otherwise.
    """
    kwargs = {**connection_kwargs(url, timeout_s), "retry_on_error": list(_RETRY_ON)}
    plain = aioredis.Redis(**{**kwargs, **extra}).connection_pool  # the URL's connection class
    pool = aioredis.BlockingConnectionPool(
        connection_class=plain.connection_class,
        max_connections=_MAX_CONNECTIONS,
        timeout=math.ceil(timeout_s),  # a wait for a free connection: none with no limit
        **plain.connection_kwargs,
    )
    return aioredis.Redis.from_pool(pool)


def sync_client(url: str, timeout_s: float, **extra: Any) -> redis.Redis:
    """A blocking client for ``url`` with bounded calls."""
    kwargs = {**connection_kwargs(url, timeout_s), "retry_on_error": list(_RETRY_ON)}
    return redis.Redis(**{**kwargs, **extra})
