"""Every Redis connection capi opens, from one parser of ``CAPI_REDIS_URL``.

The producers, the CLI, the worker and arq's own loop all get their clients here, so a
URL means the same thing everywhere (percent-encoded passwords, ``?ssl_ca_certs=``,
``redis://host:port/``), and every client has a bounded time per call:
``CAPI_REDIS_TIMEOUT_S`` for connecting and for each answer. A frozen Redis therefore
costs a caller at most that long (plus the worker's read block), never for ever.

The worker's clients answer the same way; the worker itself decides what to do when a
call fails (it waits and tries again, see :mod:`capi.worker.sender`).

With Redis Sentinel (``CAPI_REDIS_SENTINELS``, ``CAPI_REDIS_SENTINEL_MASTER``) the same
clients find the master through the sentinels (redis-py's sentinel pools): each new
connection asks them where the master is, a connection whose server answers READONLY (a
demoted master) is closed and the call sent once more to the master they name now, and a
dropped connection is retried the same way. Each pool also asks the sentinels again at most
every ``MASTER_CHECK_S`` while it is used: after a switchover (``SENTINEL FAILOVER``) the
old master accepts writes for seconds until a sentinel demotes it, and what lands there is
lost, so once the sentinels name another master the pool's connections to the old one are
closed (idle ones at once, one in use when it is next taken). The call that looks waits for
the sentinels' answer at most ``MASTER_CHECK_WAIT_S``: silent sentinels do not hold up calls
to a master that answers. ``CAPI_REDIS_URL`` then gives only the
password, TLS options and database of the master's connections; its host is not used.

With a Redis Cluster (``CAPI_REDIS_CLUSTER=true``) the clients are redis-py's cluster
clients, started from the node ``CAPI_REDIS_URL`` names: each command goes to the master of
its key's slot, follows MOVED answers, and finds the new topology after a failover. They
answer every command capi sends (capi's multi-key commands and scripts stay within one
slot, see :mod:`capi.index`), so they are typed as plain clients; the few places that
differ ask :func:`is_cluster`. A cluster error that redis-py raises outside its error tree
(no node reachable, a slot not covered during a failover) is raised as a ConnectionError,
which every caller already rides out.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import hiredis
import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.asyncio.sentinel as aiosentinel
import redis.cluster
import redis.exceptions
import redis.sentinel
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


@dataclass(frozen=True)
class Sentinels:
    """Where the sentinels are, and the name of the master they watch."""

    addresses: tuple[tuple[str, int], ...]
    master: str


def parse_sentinels(value: str) -> tuple[tuple[str, int], ...]:
    """``host:port`` entries, comma-separated (``[::1]:26379`` for IPv6); ValueError naming
    the entry and the rule otherwise."""
    return parse_addresses(value, "sentinel", 26379)


def parse_cluster_nodes(value: str) -> tuple[tuple[str, int], ...]:
    """:func:`parse_sentinels` for nodes of a Redis Cluster (``CAPI_REDIS_CLUSTER_NODES``)."""
    return parse_addresses(value, "node", 7000)


def parse_addresses(value: str, what: str, example_port: int) -> tuple[tuple[str, int], ...]:
    """``host:port`` entries of ``what`` (sentinels, cluster nodes), comma-separated."""
    found = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or any(c.isspace() or c in "/@" for c in host):
            raise ValueError(f"{entry[:60]!r} must be host:port, as in 10.0.0.5:{example_port}")
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"{entry[:60]!r} must end in a port from 1 to 65535")
        found.append((host, int(port)))
    if not found:
        raise ValueError(f"must list at least one {what} as host:port, comma-separated")
    return tuple(found)


class _HiredisPacking:
    """capi's asyncio connections: redis-py's, with two differences.

    Commands are packed by hiredis's C packer, as redis-py's blocking client does when
    hiredis is installed; its asyncio client (5.x) packs each argument in Python, which
    cost about 180 us for one enqueue script call of 32 events (6 us an event, about as much
    as validating it). The bytes sent are the same (bytes as they are, a str in UTF-8, a
    number as repr() writes it); an argument hiredis does not take (a bool, None) goes
    through redis-py's packer, which refuses it as it always has. And a write to a
    connection already closed is a ConnectionError (:meth:`send_packed_command`)."""

    encoder: Any

    def pack_command(self, *args: Any) -> list[bytes]:
        encoder = self.encoder
        if (
            args
            and type(args[0]) is str
            and encoder.encoding == "utf-8"
            and encoder.encoding_errors == "strict"
        ):
            try:
                return [hiredis.pack_command((*args[0].encode().split(), *args[1:]))]
            except TypeError:
                pass
        return super().pack_command(*args)  # type: ignore[misc, no-any-return]

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """redis-py's, with uvloop's refusal to write to a transport already closed (Redis
        killed while a connection was being opened or used: a RuntimeError that redis-py
        lets through, and the intake answered 500) raised as the ConnectionError it is: the
        call is then sent once more on a new connection, or reported as Redis away."""
        try:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except RuntimeError as exc:
            if not _closed_transport(exc):
                raise
            raise redis.exceptions.ConnectionError(
                f"connection closed under the call ({exc})"
            ) from exc


class _AsyncConnection(_HiredisPacking, aioredis.Connection):
    pass


class _AsyncSSLConnection(_HiredisPacking, aioredis.SSLConnection):
    pass


class _AsyncUnixConnection(_HiredisPacking, aioredis.UnixDomainSocketConnection):
    pass


_PACKING = {
    aioredis.Connection: _AsyncConnection,
    aioredis.SSLConnection: _AsyncSSLConnection,
    aioredis.UnixDomainSocketConnection: _AsyncUnixConnection,
}


def async_client(
    url: str,
    timeout_s: float,
    sentinels: Sentinels | None = None,
    *,
    cluster: bool = False,
    nodes: tuple[tuple[str, int], ...] = (),
    **extra: Any,
) -> aioredis.Redis:
    """An asyncio client for ``url`` (or for the sentinels' master), each call bounded.
    On a cluster, ``nodes`` (``CAPI_REDIS_CLUSTER_NODES``) are asked for the topology too.

    redis-py's plain asyncio pool connects a new connection while it holds the pool's lock,
    so against a frozen Redis concurrent callers queued behind each other's connect (five
    callers failed after 1, 1, 2, 3 and 4 timeouts). Its BlockingConnectionPool connects
    outside the lock; with no practical limit on connections it never blocks otherwise.
    The sentinel pool is the same blocking pool with redis-py's sentinel behaviour.
    """
    kwargs = {**connection_kwargs(url, timeout_s), "retry_on_error": list(_RETRY_ON)}
    if cluster:
        startup = [aiocluster.ClusterNode(host, port) for host, port in nodes]
        found: Any = _AsyncCluster(  # type: ignore[abstract]
            **_cluster_kwargs(kwargs, extra), startup_nodes=startup
        )
        return cast(aioredis.Redis, found)
    if sentinels is not None:
        return _async_master(sentinels, timeout_s, _master_kwargs(kwargs, extra))
    plain = aioredis.Redis(**{**kwargs, **extra}).connection_pool  # the URL's connection class
    pool = aioredis.BlockingConnectionPool(
        connection_class=_PACKING.get(plain.connection_class, plain.connection_class),
        max_connections=_MAX_CONNECTIONS,
        timeout=math.ceil(timeout_s),  # a wait for a free connection: none with no limit
        **plain.connection_kwargs,
    )
    return aioredis.Redis.from_pool(pool)


def async_node_client(node: Any) -> aioredis.Redis:
    """A client of its own for one node of an asyncio cluster client (a pipeline and its
    WAIT on one connection): the node's connection settings, with capi's connection class
    (:class:`_HiredisPacking`: a write to a connection closed under it, as a failover does,
    is a ConnectionError, not uvloop's RuntimeError)."""
    cls = node.connection_class
    pool = aioredis.ConnectionPool(
        connection_class=_PACKING.get(cls, cls), **node.connection_kwargs
    )
    return aioredis.Redis.from_pool(pool)


def sync_client(
    url: str,
    timeout_s: float,
    sentinels: Sentinels | None = None,
    *,
    cluster: bool = False,
    nodes: tuple[tuple[str, int], ...] = (),
    **extra: Any,
) -> redis.Redis:
    """A blocking client for ``url`` (or for the sentinels' master, or the cluster of the
    node ``url`` names, and of ``nodes``) with bounded calls."""
    kwargs = {**connection_kwargs(url, timeout_s), "retry_on_error": list(_RETRY_ON)}
    if cluster:
        startup = [
            redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
            for host, port in nodes
        ]
        found = cast(Any, _SyncCluster)(**_cluster_kwargs(kwargs, extra), startup_nodes=startup)
        return cast(redis.Redis, found)
    if sentinels is not None:
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(sentinels.addresses),
            sentinel_kwargs=_sentinel_kwargs(timeout_s),
            **_master_kwargs(kwargs, extra),
        )
        ssl = sentinel.connection_kwargs.pop("ssl", False)
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            sentinels.master,
            connection_pool_class=_SyncMasterPool,
            connection_class=_SyncSSLMasterConnection if ssl else _SyncMasterConnection,
        )
        return client
    return redis.Redis(**{**kwargs, **extra})


def is_cluster(client: object) -> bool:
    """Whether a client is a Redis Cluster client (see the module docstring)."""
    return isinstance(client, aiocluster.RedisCluster | redis.cluster.RedisCluster)


def describe(client: redis.Redis | aioredis.Redis) -> str:
    """Where a client's calls go, for messages: ``host:port``, a socket path, the
    sentinels' master (with its address when known), or the cluster of a node."""
    if is_cluster(client):
        nodes: Any = client
        return cluster_of(nodes.nodes_manager.startup_nodes)
    pool = client.connection_pool
    if isinstance(pool, _SENTINEL_POOLS):
        manager = pool.sentinel_manager
        listed = ",".join(
            f"{s.connection_pool.connection_kwargs.get('host')}:"
            f"{s.connection_pool.connection_kwargs.get('port')}"
            for s in manager.sentinels
        )
        known = pool.master_address
        at = f" (last at {known[0]}:{known[1]})" if known else ""
        return f"the master {pool.service_name!r} of the sentinels {listed}{at}"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', 6379)}"


def cluster_of(nodes: Iterable[str]) -> str:
    """A cluster for messages, by the ``host:port`` of the nodes it was started from (each
    once: the URL's node may be listed again in CAPI_REDIS_CLUSTER_NODES)."""
    return f"the Redis Cluster of {','.join(sorted(set(nodes)))}"


CLUSTER_SETTINGS = (
    "CAPI_REDIS_URL, CAPI_REDIS_CLUSTER_NODES (nodes of the cluster), CAPI_REDIS_CLUSTER"
)


def settings_hint(client: redis.Redis | aioredis.Redis) -> str:
    """The settings that say where a client's Redis is, for "check ..." in messages."""
    if is_cluster(client):
        return CLUSTER_SETTINGS
    if isinstance(client.connection_pool, _SENTINEL_POOLS):
        return "CAPI_REDIS_SENTINELS and CAPI_REDIS_SENTINEL_MASTER"
    return "CAPI_REDIS_URL"


def brief(exc: BaseException) -> str:
    """An error's text for a message; redis-py's "no master found" (which holds the repr of
    each sentinel client) becomes one plain sentence."""
    if not isinstance(exc, redis.sentinel.MasterNotFoundError | aiosentinel.MasterNotFoundError):
        return str(exc)
    head, _, errors = str(exc).partition(" : ")
    found = re.search(r"for '(.*)'", head)
    name = found.group(1)[:100] if found else "?"
    silent = len(re.findall(r" - \w+\(", errors))
    if silent:
        return f"no master named {name!r} found: {silent} of the sentinels did not answer"
    return f"no sentinel knows a master named {name!r} that is up"


_SENTINEL_POOLS = (aiosentinel.SentinelConnectionPool, redis.sentinel.SentinelConnectionPool)


def _sentinel_kwargs(timeout_s: float) -> dict[str, Any]:
    """How the sentinels themselves are asked: bounded like every other call."""
    return {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}


def _master_kwargs(kwargs: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The master connections' arguments: the URL's password, TLS and database; the host
    and port come from the sentinels."""
    merged = {**kwargs, **extra}
    for name in ("host", "port", "unix_socket_path"):
        merged.pop(name, None)
    return merged


class _AsyncMasterConnection(_HiredisPacking, aiosentinel.SentinelManagedConnection):
    """redis-py's sentinel connection, connecting once more only when the connection
    failed, not when it timed out: a frozen master costs one CAPI_REDIS_TIMEOUT_S, as a
    plain connection's does (redis-py retries the whole connect on a timeout too)."""

    async def connect(self) -> None:
        try:
            await self._connect_retry()  # type: ignore[no-untyped-call]
        except redis.exceptions.ConnectionError:
            await self.disconnect()
            await self._connect_retry()  # type: ignore[no-untyped-call]


class _AsyncSSLMasterConnection(_AsyncMasterConnection, aioredis.SSLConnection):
    pass


# How often a sentinel pool in use asks the sentinels again where the master is, and how
# long the call that takes a connection then waits for their answer (the look goes on
# meanwhile: silent sentinels do not hold up calls to a master that answers).
MASTER_CHECK_S = 1.0
MASTER_CHECK_WAIT_S = 0.25


class _AsyncMasterPool(aiosentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """redis-py's sentinel pool over its BlockingConnectionPool, which connects new
    connections outside the pool's lock (see :func:`async_client`). Closing it closes the
    connections to the sentinels too (redis-py leaves them open). It follows a switchover
    (see the module docstring), asking the sentinels in the call that takes a connection
    (at most every ``MASTER_CHECK_S``, waiting for their answer at most
    ``MASTER_CHECK_WAIT_S``: the look goes on in the background, one at a time; redis-py
    asks first the sentinel that answered last, so a silent one delays a look once)."""

    _master_checked = float("-inf")
    _master_check: asyncio.Task[None] | None = None

    async def get_connection(self, *args: Any, **options: Any) -> Any:
        now = time.monotonic()
        check = self._master_check
        idle = check is None or check.done() or check.get_loop() is not asyncio.get_running_loop()
        if now - self._master_checked >= MASTER_CHECK_S and idle:
            self._master_checked = now
            # The look goes on in the background past MASTER_CHECK_WAIT_S: silent
            # sentinels (asked in turn, each for CAPI_REDIS_TIMEOUT_S) do not hold up a
            # call to a master that answers; one look at a time.
            check = self._master_check = asyncio.ensure_future(self._look_at_sentinels())
            await asyncio.wait([check], timeout=MASTER_CHECK_WAIT_S)
        connection = await super().get_connection(*args, **options)
        stale = self.master_address is not None and connection.is_connected
        if stale and (connection.host, connection.port) != self.master_address:
            try:  # opened to a master the sentinels no longer name: connect anew
                await connection.disconnect()
                await self.ensure_connection(connection)
            except BaseException:
                await self.release(connection)
                raise
        return connection

    async def _look_at_sentinels(self) -> None:
        # redis-py's pool closes its idle connections if the master moved; a silent
        # sentinel or no master named is for the next connect to say.
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await self.get_master_address()  # type: ignore[no-untyped-call]

    async def disconnect(self, inuse_connections: bool = True) -> None:
        check = self._master_check
        if inuse_connections and check is not None and not check.done():
            check.cancel()  # closing: a look still waiting on a silent sentinel ends
            if check.get_loop() is asyncio.get_running_loop():
                with contextlib.suppress(asyncio.CancelledError):
                    await check
        await super().disconnect(inuse_connections)
        if inuse_connections:
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.connection_pool.disconnect()


class _SyncMasterConnection(redis.sentinel.SentinelManagedConnection):
    """The blocking twin of :class:`_AsyncMasterConnection`."""

    def connect(self) -> None:
        try:
            self._connect_retry()  # type: ignore[no-untyped-call]
        except redis.exceptions.ConnectionError:
            self.disconnect()  # type: ignore[no-untyped-call]
            self._connect_retry()  # type: ignore[no-untyped-call]


class _SyncSSLMasterConnection(_SyncMasterConnection, redis.SSLConnection):
    pass


class _SyncMasterPool(redis.sentinel.SentinelConnectionPool):
    """redis-py's sentinel pool; closing it closes the connections to the sentinels too. It
    follows a switchover (see the module docstring), asking the sentinels in the call that
    takes a connection (at most every ``MASTER_CHECK_S``, waiting at most
    ``MASTER_CHECK_WAIT_S``: the look goes on in a thread of its own, one at a time)."""

    _master_checked = float("-inf")
    _master_check: threading.Thread | None = None

    def get_connection(self, *args: Any, **options: Any) -> Any:
        now = time.monotonic()
        check = self._master_check
        idle = check is None or not check.is_alive()
        if now - self._master_checked >= MASTER_CHECK_S and idle:
            self._master_checked = now
            # As the asyncio pool: a look at silent sentinels goes on in a thread of its
            # own past MASTER_CHECK_WAIT_S, one at a time.
            check = self._master_check = threading.Thread(
                target=self._look_at_sentinels, name="capi-sentinel-look", daemon=True
            )
            check.start()
            check.join(MASTER_CHECK_WAIT_S)
        connection = super().get_connection(*args, **options)
        stale = self.master_address is not None and connection._sock is not None
        if stale and (connection.host, connection.port) != self.master_address:
            try:  # opened to a master the sentinels no longer name: connect anew
                connection.disconnect()
                connection.connect()
            except BaseException:
                self.release(connection)
                raise
        return connection

    def _look_at_sentinels(self) -> None:
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            self.get_master_address()  # type: ignore[no-untyped-call]

    def disconnect(self, inuse_connections: bool = True) -> None:
        super().disconnect(inuse_connections)
        if inuse_connections:
            for sentinel in self.sentinel_manager.sentinels:
                sentinel.connection_pool.disconnect()


def _async_master(sentinels: Sentinels, timeout_s: float, kwargs: dict[str, Any]) -> aioredis.Redis:
    sentinel = aiosentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(sentinels.addresses), sentinel_kwargs=_sentinel_kwargs(timeout_s), **kwargs
    )
    ssl = sentinel.connection_kwargs.pop("ssl", False)
    client: aioredis.Redis = sentinel.master_for(
        sentinels.master,
        connection_pool_class=_AsyncMasterPool,
        connection_class=_AsyncSSLMasterConnection if ssl else _AsyncMasterConnection,
        max_connections=_MAX_CONNECTIONS,
        timeout=math.ceil(timeout_s),
    )
    return client


def _cluster_kwargs(kwargs: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A cluster client's arguments: the URL's node, password and TLS (a cluster has only
    database 0, which the settings check)."""
    merged = {**kwargs, **extra}
    merged.pop("db", None)
    return merged


def _cluster_error(exc: redis.exceptions.RedisClusterException) -> redis.exceptions.ConnectionError:
    return redis.exceptions.ConnectionError(f"Redis Cluster: {exc}")


class _AsyncCluster(aiocluster.RedisCluster):
    """redis-py's asyncio cluster client, raising its errors outside redis-py's error tree
    (no node reachable, a slot not covered) as ConnectionError (see the module docstring).

    redis-py (5.3) closes every connection of the client when one command meets a
    ConnectionError (to read the topology again); a command or pipeline of another task
    then finds its connection's writer gone (AttributeError), or, under uvloop (capi
    serve), its transport closed (RuntimeError "... the handler is closed"). It is the same
    dropped connection, raised as such.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nodes_manager.__class__ = _AsyncNodes

    async def initialize(self) -> aiocluster.RedisCluster:
        with _translated_cluster():
            return await super().initialize()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        with _translated_cluster():
            return await super().execute_command(*args, **kwargs)

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> aiocluster.ClusterPipeline:
        if transaction or shard_hint:
            return super().pipeline(transaction, shard_hint)  # refused, as redis-py says
        pipe: aiocluster.ClusterPipeline = cast(Any, _AsyncClusterPipeline)(self)
        return pipe


class _AsyncNodes(aiocluster.NodesManager):
    """redis-py's nodes manager, which asks every node it last knew when it reads the
    topology again (see :func:`_asked_again`)."""

    __slots__ = ()

    async def initialize(self) -> None:
        _asked_again(self)
        await super().initialize()
        _kept_apart(self)


def _asked_again(nodes: Any) -> None:
    """Put the nodes of the last topology read back among those asked for the next one.

    redis-py (5.3) drops a node from the nodes it asks for the topology on every
    connection error to it, and refills them only from a topology it read. Under a failover
    with calls in flight, every master can fail one call (redis-py closes every connection
    of the client on the first error, failing the calls of other tasks), leaving none to
    ask: it then read the topology from nobody ever after ("Please provide at least one
    reachable node: None"), and capi serve answered 503 for good though the cluster was
    back. A node that is gone costs one failed connect; the others answer.

    The nodes asked become a :class:`_Snapshot`: redis-py asks them one after another
    across awaits while other calls drop nodes (on their errors) or set them (at the end of
    their own read), and its loop over a changing dict raised "dictionary changed size
    during iteration", an error outside redis-py's tree that failed the request (500)."""
    _kept_apart(nodes)
    for name, node in nodes.nodes_cache.items():
        nodes.startup_nodes.setdefault(name, node)


def _kept_apart(nodes: Any) -> None:
    """The nodes to ask as a :class:`_Snapshot` of their own. The blocking client (5.3)
    makes them the very dict of the last topology's nodes after each read, so a node it
    dropped was gone from both and :func:`_asked_again` had nothing to put back."""
    if type(nodes.startup_nodes) is not _Snapshot:
        nodes.startup_nodes = _Snapshot(nodes.startup_nodes)


class _Snapshot(dict[str, Any]):
    """A dict whose values are read as a copy (a loop over them is not upset by a change)."""

    def values(self) -> list[Any]:  # type: ignore[override]
        return list(super().values())


class _AsyncClusterPipeline(aiocluster.ClusterPipeline):
    """redis-py's cluster pipeline, its errors raised as :class:`_AsyncCluster` says."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        with _translated_cluster():
            return await super().execute(raise_on_error, allow_redirections)


@contextlib.contextmanager
def _translated_cluster() -> Iterator[None]:
    try:
        yield
    except redis.exceptions.RedisClusterException as exc:
        raise _cluster_error(exc) from exc
    except AttributeError as exc:
        raise redis.exceptions.ConnectionError(f"connection closed under the call ({exc})") from exc
    except RuntimeError as exc:
        if not _closed_transport(exc):
            raise
        raise redis.exceptions.ConnectionError(f"connection closed under the call ({exc})") from exc


def _closed_transport(exc: RuntimeError) -> bool:
    """Whether uvloop refused to write to a transport already closed (its words)."""
    return "the handler is closed" in str(exc)


class _SyncCluster(redis.cluster.RedisCluster):
    """The blocking twin of :class:`_AsyncCluster` (which reads the topology at once)."""

    def __init__(self, **kwargs: Any) -> None:
        with _translated_cluster():
            super().__init__(**kwargs)
        self.nodes_manager.__class__ = _SyncNodes
        _kept_apart(self.nodes_manager)  # the topology was read once, unpatched

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        with _translated_cluster():
            return super().execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]


class _SyncNodes(redis.cluster.NodesManager):
    """The blocking twin of :class:`_AsyncNodes`."""

    __slots__ = ()

    def initialize(self) -> None:
        _asked_again(self)
        super().initialize()  # type: ignore[no-untyped-call]
        _kept_apart(self)
