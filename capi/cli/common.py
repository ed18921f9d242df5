"""What every command shares: loading settings, printing, and mapping errors to exit codes."""

from __future__ import annotations

import asyncio
import functools
import os
import pwd
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import IO, Any, NoReturn, ParamSpec, TypeVar

import click
import orjson
import redis.asyncio as aioredis
import redis.asyncio.sentinel as aiosentinel
import redis.exceptions
import redis.sentinel
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from capi.destinations import key_variables
from capi.errors import CapiError, ConfigError, QueueFull, QueueUnavailable
from capi.exitcodes import ExitCode
from capi.redisconn import brief
from capi.settings import Settings
from capi.trouble import classify

P = ParamSpec("P")
T = TypeVar("T")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def settings_from(ctx: click.Context) -> Settings:
    """The settings for this invocation (loaded once, on first use; a ``CAPI_*`` variable
    that is no setting is warned about on stderr, with the setting it may be a typo of)."""
    obj = ctx.ensure_object(dict)
    if "settings" not in obj:
        loaded = obj["settings"] = Settings.load(obj.get("config_file"))
        for warning in loaded.unknown_variables(key_variables(loaded)):
            err.print(f"warning: {warning}", markup=False)
    settings: Settings = obj["settings"]
    return settings


def plural(n: int, noun: str) -> str:
    """``1 dead letter``, ``2 dead letters``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def note_default_redis(settings: Settings) -> None:
    """Say on stderr which Redis is used when CAPI_REDIS_URL is not set anywhere (and no
    sentinels name it)."""
    if "redis_url" not in settings.model_fields_set and settings.sentinels is None:
        err.print(
            f"note: using {settings.redis_url}, the default Redis: CAPI_REDIS_URL is not set "
            f"(in {settings.config_source()})",
            markup=False,
        )


def cli_actor() -> str:
    """Who runs a command, for the audit of replays and purges: ``cli:user@host`` (the
    console writes its token's fingerprint instead). The user is the one the process runs
    as (its passwd entry, else its uid), not what LOGNAME or USER say."""
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:  # no passwd entry (a bare container)
        user = f"uid {uid}"
    return f"cli:{user}@{socket.gethostname()}"


def redis_client(settings: Settings, **extra: Any) -> aioredis.Redis:
    """A client for the settings' Redis (noting on stderr when it is the default);
    ``extra``: the client's own options, such as a longer ``socket_timeout``."""
    note_default_redis(settings)
    return settings.async_redis(**extra)


def fail(message: str, code: ExitCode) -> NoReturn:
    """Print an error to stderr and exit with a named code."""
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True)
    sys.exit(code)


def handle_errors(func: Callable[P, T]) -> Callable[P, T]:
    """Catch CapiError (and Redis being away) once, and exit with the matching code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            fail(str(exc), ExitCode.CONFIG)
        except QueueFull as exc:
            fail(str(exc), ExitCode.REDIS_FULL)
        except QueueUnavailable as exc:
            fail(str(exc), ExitCode.REDIS)
        except redis.exceptions.ResponseError as exc:
            if "DB index" in str(exc):
                fail(
                    f"CAPI_REDIS_URL: that Redis has no such database ({exc}); use one it "
                    "has: 0 to 15 unless its redis.conf sets 'databases' higher",
                    ExitCode.CONFIG,
                )
            kind, meaning = classify(exc)
            fail(f"{meaning} ({exc})", ExitCode.REDIS_FULL if kind == "full" else ExitCode.REDIS)
        except (redis.sentinel.MasterNotFoundError, aiosentinel.MasterNotFoundError) as exc:
            fail(
                f"Redis is not reachable ({brief(exc)}); check CAPI_REDIS_SENTINELS and "
                "CAPI_REDIS_SENTINEL_MASTER",
                ExitCode.REDIS,
            )
        except redis.exceptions.AuthenticationError as exc:  # a ConnectionError to redis-py
            fail(f"{classify(exc)[1]} ({exc})", ExitCode.REDIS)
        except redis.exceptions.ConnectionError as exc:
            fail(f"Redis is not reachable ({exc}); {_where()}", ExitCode.REDIS)
        except redis.exceptions.TimeoutError as exc:
            fail(
                f"Redis did not answer within CAPI_REDIS_TIMEOUT_S ({exc}); is it frozen or "
                "overloaded, or is what listens there not Redis (a wrong port, or rediss:// "
                f"to a Redis without TLS)? {_where()}",
                ExitCode.REDIS,
            )
        except redis.exceptions.RedisError as exc:
            fail(f"{classify(exc)[1]} ({exc})", ExitCode.REDIS)
        except CapiError as exc:
            fail(str(exc), ExitCode.FAILURE)

    return wrapper


def _where() -> str:
    """What to check when Redis does not answer: the settings that say where it is, as
    this command loaded them. Under Sentinel the URL's host is not used, and on a cluster
    the address in the error is a node the cluster named, not the URL's."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    settings = obj.get("settings") if isinstance(obj, dict) else None
    if isinstance(settings, Settings) and settings.redis_cluster:
        return (
            "a master of the Redis Cluster may be down (its replica takes over after "
            "cluster-node-timeout); check the cluster's nodes, and that one of those "
            "CAPI_REDIS_URL and CAPI_REDIS_CLUSTER_NODES name answers"
        )
    if isinstance(settings, Settings) and settings.sentinels is not None:
        return (
            "the master the sentinels name may be down (a failover follows after their "
            "down-after-milliseconds); check CAPI_REDIS_SENTINELS and "
            "CAPI_REDIS_SENTINEL_MASTER"
        )
    return "check CAPI_REDIS_URL"


class PrivateFile(click.ParamType[IO[bytes]]):
    """A file opened for binary writing that only its owner can read (mode 0600), since
    exports carry event data; ``-`` is stdout."""

    name = "file"

    def __init__(self, *, new: bool = False, why: str = "") -> None:
        self.new = new  # refuse a file that exists (saying ``why``)
        self.why = why

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        if value == "-":
            return sys.stdout.buffer
        if self.new and os.path.lexists(value):
            self.fail(f"{value} exists{self.why}; remove it or name another file", param, ctx)
        try:
            file = open_private(value)
        except OSError as exc:
            self.fail(f"{value}: {exc.strerror}", param, ctx)
        if ctx is not None:
            ctx.call_on_close(file.close)
        return file


def open_private(path: str) -> IO[bytes]:
    """``path`` opened for binary writing, truncated, mode 0600 (also when it existed);
    the file's ``name`` is the path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    file = os.fdopen(fd, "wb")
    file.raw.name = path  # type: ignore[attr-defined]  # for messages; an fd otherwise
    return file


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from a command."""
    return asyncio.run(coro)


def print_json(value: Any) -> None:
    """Print one JSON document on one line."""
    sys.stdout.write(orjson.dumps(value).decode() + "\n")


class progress:
    """A progress bar on a terminal, nothing otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        self.bar: Progress | None = None

    def __enter__(self) -> Callable[[int], None]:
        if not out.is_terminal or self.total == 0:
            return lambda n: None
        self.bar = Progress(console=out)
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        bar = self.bar
        return lambda n: bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
