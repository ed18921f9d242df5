"""Redis Cluster for real: three masters and three replicas (tests/clusterproc.py), with
``CAPI_REDIS_CLUSTER=true``. Many destinations deliver everything with their keys spread
over every shard; a master killed with ``kill -9`` under load (two producers, two
``capi worker``, ``CAPI_ENQUEUE_DURABILITY=replica``) loses no acknowledged event, and
duplicates are counted and bounded (``pytest -s -n 0 tests/test_cluster.py`` prints the
figures); the operators' commands and the intake work across shards, and the intake
answers 200 or 503 (never 500, and not 503 for good) through a master killed under load."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from redis.asyncio.cluster import ClusterNode
from redis.cluster import PRIMARY

from capi import coverage, dedup, index
from capi.constants import RedisKeys
from capi.errors import ConfigError, QueueUnavailable
from capi.events import prepare
from capi.intake import tokens
from capi.producer import Producer, SyncProducer
from capi.queue import ENQUEUE_LUA, enqueue_call, lua
from capi.redisconn import async_client, sync_client
from capi.sandbox import SandboxThread
from capi.sandbox.state import DEFAULT_KEY, DEFAULT_PIXEL, Fault
from capi.settings import Settings
from capi.status import overview
from tests.clusterproc import ClusterSet, cluster_settings
from tests.conftest import free_port
from tests.console_helpers import httpx_get, new_tokens, start_console
from tests.helpers import _plain as plain_settings
from tests.helpers import (
    capi,
    enqueue,
    events,
    http_get,
    spawn,
    start_worker,
    stop_worker,
    wait_for,
)
from tests.intake_helpers import TOKEN, start_intake
from tests.test_destinations_scale import configure
from workers.main import worker_settings

BATCH_SIZE = 20
CONCURRENCY = 2
WORKERS = 2  # in the failover test
# A worker runs 4 lanes per CAPI_CONCURRENCY, each with at most one batch in flight.
IN_FLIGHT_BOUND = WORKERS * 4 * CONCURRENCY * BATCH_SIZE


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterSet]:
    with ClusterSet(tmp_path / "cluster") as found:
        yield found


def names(count: int) -> list[str]:
    return [f"d{i}" for i in range(count)]


def setup(
    tmp_path: Path, sandbox: SandboxThread, cluster: ClusterSet, count: int, **overrides: Any
) -> tuple[Settings, dict[str, str]]:
    path, env = configure(tmp_path, sandbox, count)
    settings = cluster_settings(
        sandbox,
        cluster,
        destinations_file=path,
        batch_size=BATCH_SIZE,
        concurrency=CONCURRENCY,
        **overrides,
    )
    return settings, env


def shards_of(cluster: ClusterSet, settings: Settings, count: int) -> dict[int, list[str]]:
    """The destinations whose keys (their stats hash: every destination has one once it
    was enqueued to) live on each master, by port, read from the masters themselves."""
    found: dict[int, list[str]] = {}
    for name in names(count):
        keys = settings.keys.for_destination(name)
        node = cluster.node_of(keys.stream)
        with node.client() as c:
            assert c.exists(keys.stats, keys.stream) == 2, name  # one slot: one node
        found.setdefault(node.port, []).append(name)
    return found


def test_thirty_destinations_deliver_everything_spread_over_every_shard(
    tmp_path: Path, sandbox: SandboxThread, cluster: ClusterSet
) -> None:
    settings, env = setup(tmp_path, sandbox, cluster, 30)
    worker = start_worker(settings, **env)
    sent: set[str] = set()

    def produce_sync(part: list[str]) -> None:
        with SyncProducer.from_settings(settings) as producer:
            for name in part:
                batch = events(40, prefix=f"{name}-")
                assert producer.enqueue_many(batch, destination=name).queued == 40
                sent.update(e["id"] for e in batch)

    async def produce_async(part: list[str]) -> None:
        async with Producer.from_settings(settings) as producer:
            for name in part:
                for event in events(10, start=100, prefix=f"{name}-"):
                    assert await producer.enqueue(event, destination=name)
                    sent.add(event["id"])

    threads = [
        threading.Thread(target=produce_sync, args=(names(30)[:15],)),
        threading.Thread(target=lambda: asyncio.run(produce_async(names(30)[15:]))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(sent) == 15 * 40 + 15 * 10
    wait_for(lambda: sent <= set(sandbox.state.delivered_ids()), 120, "every event delivered")
    client = settings.sync_redis()
    try:
        # Every stream is read empty in the end, which takes each destination out of the
        # index (the read after the last delivery may come a moment after the sandbox saw it).
        wait_for(
            lambda: (
                not client.smembers(settings.keys.active)
                and not any(
                    client.exists(settings.keys.for_destination(n).armed) for n in names(30)
                )
            ),
            60,
            "every destination out of the index",
        )
        for name in names(30):
            keys = settings.keys.for_destination(name)
            assert int(client.hget(keys.stats, "delivered") or 0) >= (40 if name < "d15" else 10)
    finally:
        client.close()
    output = stop_worker(worker)
    assert "Traceback" not in output, output
    spread = shards_of(cluster, settings, 30)
    assert len(spread) == 3, spread  # every master holds some destinations
    assert {len(v) for v in spread.values()} != {30}


def test_a_write_whose_writer_died_before_the_index_is_swept_back(
    tmp_path: Path, sandbox: SandboxThread, cluster: ClusterSet
) -> None:
    """A producer killed between its script and the active set (played: the script alone)
    leaves the destination flagged but not active; a worker's sweep finds it."""
    settings, env = setup(tmp_path, sandbox, cluster, 3)
    worker = start_worker(settings, **env)
    client = settings.sync_redis()
    try:
        with SyncProducer.from_settings(settings) as producer:
            producer.enqueue_many(events(5, prefix="first-"), destination="d1")
        wait_for(lambda: len(sandbox.state.delivered_ids()) == 5, 60, "the first events")
        keys = settings.keys.for_destination("d1")
        wait_for(lambda: not client.exists(keys.armed), 60, "d1 read empty")
        assert b"d1" not in client.smembers(settings.keys.active)
        wait_for(lambda: unread_for(client, keys, 2000), 60, "the worker to stop reading d1")
        script = client.register_script(lua(keys, ENQUEUE_LUA))
        lone = events(1, prefix="lone-")[0]
        p = prepare(lone)
        digest = dedup.digest(f"{p.name}:{p.id}")
        call = enqueue_call(
            keys, 60, [(digest, p.id, p.timestamp_ms, p.json, coverage.mask(p.event))]
        )
        answer = script(keys=call[0], args=call[1])
        assert index.unpack(keys, answer)[1]  # it set the flag; nobody adds it to the set
        # Within the sweep's SWEEP_S (not the 60 s of the worker's other index checks).
        wait_for(lambda: lone["id"] in sandbox.state.delivered_ids(), 40, "the swept event")
    finally:
        client.close()
        stop_worker(worker)


def test_retries_come_back_through_the_retry_due_index(
    tmp_path: Path, sandbox: SandboxThread, cluster: ClusterSet
) -> None:
    """Every other request fails (503, and 429 with Retry-After): retries are scheduled,
    indexed on the shared slot and moved back, on every shard."""
    settings, env = setup(tmp_path, sandbox, cluster, 6)
    sandbox.state.faults.append(Fault("server_error", every=2, status=503))
    sandbox.state.faults.append(Fault("rate_limit", every=5, retry_after_s=0.2))
    sent = set()
    with SyncProducer.from_settings(settings) as producer:
        for name in names(6):
            batch = events(30, prefix=f"{name}-")
            assert producer.enqueue_many(batch, destination=name).queued == 30
            sent |= {e["id"] for e in batch}
    worker = start_worker(settings, "--burst", **env)
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, output
    assert sent <= set(sandbox.state.delivered_ids())
    client = settings.sync_redis()
    try:
        retried = sum(
            int(client.hget(settings.keys.for_destination(n).stats, "retried") or 0)
            for n in names(6)
        )
        assert retried > 0
        assert not client.zrange(settings.keys.retry_due, 0, -1)  # nothing left scheduled
    finally:
        client.close()


def unread_for(client: redis.Redis, keys: RedisKeys, ms: int) -> bool:
    """Whether no consumer has read the destination's stream for ``ms``."""
    consumers = client.xinfo_consumers(keys.stream, "senders")
    return all(int(c["idle"]) > ms for c in consumers)


# ---------------------------------------------------------------------------------------
# A master killed under load.


class Acks:
    """Event ids acknowledged by the producers, before and after the kill."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.before: set[str] = set()
        self.after: set[str] = set()
        self.killed_at: float | None = None
        self.retries = 0

    def add(self, event_id: str, sent_at: float) -> None:
        with self.lock:
            late = self.killed_at is not None and sent_at > self.killed_at
            (self.after if late else self.before).add(event_id)

    def all(self) -> set[str]:
        with self.lock:
            return self.before | self.after


def produce(settings: Settings, targets: list[str], acks: Acks, stop: threading.Event) -> None:
    """One event at a time, round the destinations, each sent again until acknowledged."""

    async def go() -> None:
        async with Producer.from_settings(settings) as producer:
            for i in range(1_000_000):
                name = targets[i % len(targets)]
                event = events(1, start=i, prefix=f"{name}-")[0]
                while not stop.is_set():
                    sent_at = time.monotonic()
                    try:
                        await producer.enqueue(event, destination=name)
                    except QueueUnavailable:
                        acks.retries += 1
                        await asyncio.sleep(0.05)
                        continue
                    acks.add(event["id"], sent_at)
                    break
                if stop.is_set():
                    return

    asyncio.run(go())


def test_a_master_killed_under_load_loses_no_acknowledged_event(
    tmp_path: Path, sandbox: SandboxThread, cluster: ClusterSet
) -> None:
    settings, env = setup(tmp_path, sandbox, cluster, 12, enqueue_durability="replica")
    # The master to kill: the one holding the shared index, and destinations too.
    victim = cluster.node_of(settings.keys.active)
    on_victim = [
        n for n in names(12) if cluster.node_of(settings.keys.for_destination(n).stream) is victim
    ]
    assert on_victim, "no destination on the index's shard"
    workers = [start_worker(settings, **env) for _ in range(WORKERS)]
    acks, stop = Acks(), threading.Event()
    threads = [
        threading.Thread(target=produce, args=(settings, names(12), acks, stop), daemon=True),
        threading.Thread(target=produce, args=(settings, on_victim, acks, stop), daemon=True),
    ]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(sandbox.state.delivered_ids()) >= 300, 90, "deliveries before")
        acks.killed_at = time.monotonic()
        victim.kill()  # kill -9
        wait_for(lambda: len(cluster.masters()) == 3, 60, "a replica promoted")
        cluster.wait_ok(60)
        promoted_s = time.monotonic() - acks.killed_at
        # Back as the new master's replica (its nodes.conf says who it was): until then
        # that shard has no replica, and a `replica` enqueue to it cannot be acknowledged.
        victim.start()
        cluster.wait_ok(60)
        wait_for(lambda: len(acks.after) >= 300, 120, "acknowledgements after the kill")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    acked = acks.all()
    deadline = time.monotonic() + 120
    while (missing := acked - set(sandbox.state.delivered_ids())) and time.monotonic() < deadline:
        time.sleep(0.2)
    delivered = sandbox.state.delivered_ids()
    duplicates = sum(n - 1 for n in delivered.values() if n > 1)
    outputs = [stop_worker(w) for w in workers]
    print(
        f"\ncluster failover (replica durability): cluster ok {promoted_s:.2f} s after kill -9 "
        f"of the master holding the index and {len(on_victim)} destinations; "
        f"{len(acks.before)} acked before, {len(acks.after)} after, {len(missing)} lost; "
        f"{duplicates} duplicates (bound {IN_FLIGHT_BOUND}); {acks.retries} sends retried"
    )
    assert not missing, f"{len(missing)} acknowledged events were lost, e.g. {sorted(missing)[:5]}"
    assert duplicates <= IN_FLIGHT_BOUND, f"{duplicates} duplicates"
    assert all("Traceback" not in out for out in outputs), outputs


# ---------------------------------------------------------------------------------------
# The operators' commands across shards.


def doom(settings: Settings, name: str, count: int) -> list[str]:
    """Rewrite the first ``count`` queued events of a destination so the API rejects them
    (an unknown data field); their ids."""
    keys = settings.keys.for_destination(name)
    client = settings.sync_redis()
    doomed = []
    try:
        for sid, fields in client.xrange(keys.stream, count=count):
            event = orjson.loads(fields[b"e"])
            event["data"]["coupon"] = "DOOMED"
            client.xadd(keys.stream, {**fields, b"e": orjson.dumps(event)})
            client.xdel(keys.stream, sid)
            doomed.append(event["id"])
    finally:
        client.close()
    return doomed


def run(settings: Settings, env: dict[str, str], *args: str) -> str:
    """A ``capi`` command's output (it must exit 0), given the destinations' keys."""
    done = capi(settings, *args, timeout=120, extra_env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_status_destinations_tail_and_dead_letters_work_across_shards(
    tmp_path: Path, sandbox: SandboxThread, cluster: ClusterSet
) -> None:
    settings, env = setup(tmp_path, sandbox, cluster, 9)
    assert len(shards_on_enqueue(settings, cluster, 9)) == 3
    doomed = {name: doom(settings, name, 2) for name in names(9)}
    worker = start_worker(settings, "--burst", **env)
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, output

    status = json.loads(run(settings, env, "status", "--json"))
    shown = status["destinations"]
    for name in names(9):
        assert shown[name]["counters"]["delivered"] == 3, shown[name]
        assert shown[name]["dead_letters"] == 2
    assert status["redis"]["role"] == "cluster"
    assert len(status["redis"]["shards"]) == 3

    async def console_overview() -> dict[str, dict[str, Any]]:
        client = settings.async_redis()
        try:
            return await overview(client, settings.keys, names(9))
        finally:
            await client.aclose()

    seen = asyncio.run(console_overview())  # the console's overview: every shard's reads
    assert {n: (v["counters"]["delivered"], v["dead_letters"]) for n, v in seen.items()} == {
        n: (3, 2) for n in names(9)
    }

    listed = [
        json.loads(line) for line in run(settings, env, "destinations", "--json").splitlines()
    ]
    assert sorted(d["name"] for d in listed) == sorted(names(9))

    shown_tail = run(settings, env, "tail", "--json", "-n", "1000")
    lines = [json.loads(line) for line in shown_tail.splitlines()]
    assert {line["destination"] for line in lines} == set(names(9))
    assert {line["status"] for line in lines} >= {"delivered", "dead_lettered"}

    records = [
        json.loads(r) for r in run(settings, env, "dead-letters", "list", "--json").splitlines()
    ]
    assert sorted(r["id"] for r in records) == sorted(i for ids in doomed.values() for i in ids)
    one = doomed["d4"][0]
    assert one in run(settings, env, "dead-letters", "show", one)
    replayed = run(settings, env, "dead-letters", "replay", one, "--json")
    assert json.loads(replayed)["replayed"] == 1, replayed
    keys = settings.keys.for_destination("d4")
    client = settings.sync_redis()
    try:
        assert client.xlen(keys.stream) == 1  # back on its stream, on its shard
        assert b"d4" in client.smembers(settings.keys.active)
    finally:
        client.close()
    # The console's pages read every shard too (a viewer's Bearer token, no session).
    tokens = new_tokens()
    url = start_console(settings, tokens, tmp_path / "console.log", **env)
    bearer = {"Authorization": f"Bearer {tokens.viewer}"}
    for page in ("/", "/overview.json", "/d/d4", "/d/d4/dead-letters", "/d/d4/tail.json"):
        answer = httpx_get(url + page, headers=bearer)
        assert answer.status_code == 200, (page, answer.text[:500])
    assert doomed["d7"][0] in httpx_get(url + "/d/d7/dead-letters", headers=bearer).text
    assert "Traceback" not in (tmp_path / "console.log").read_text()
    run(settings, env, "dead-letters", "purge", "--all", "--yes")
    assert run(settings, env, "dead-letters", "list", "--json").strip() == ""

    # tail --follow sees outcomes on every shard as they happen.
    followed: list[dict[str, Any]] = []
    follower = follow_tail(settings, env, followed)
    wait_for(lambda: bool(followed), 60, "tail --follow to print its first line")
    with SyncProducer.from_settings(settings) as producer:
        for name in names(9):
            producer.enqueue(events(1, start=50, prefix=f"{name}-")[0], destination=name)
    worker = start_worker(settings, "--burst", **env)
    assert worker.wait(120) == 0
    late = {f"{name}-p-50" for name in names(9)}
    wait_for(lambda: late <= {f["id"] for f in followed}, 60, "every shard's outcome followed")
    follower.kill()

    # capi enqueue fans out over shards; capi queue purge empties one destination's queue.
    lines_in = "\n".join(json.dumps(e) for e in events(4, start=60, prefix="cli-"))
    done = capi(
        settings,
        "enqueue",
        "--destination",
        ",".join(names(9)),
        "--json",
        input=lines_in,
        extra_env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["queued"] == 4 * 9, done.stdout  # one copy each
    run(settings, env, "queue", "purge", "--destination", "d2", "--yes")
    client = settings.sync_redis()
    try:
        assert client.xlen(settings.keys.for_destination("d2").stream) == 0
        assert client.xlen(settings.keys.for_destination("d3").stream) == 4
    finally:
        client.close()


def follow_tail(
    settings: Settings, env: dict[str, str], into: list[dict[str, Any]]
) -> subprocess.Popen[str]:
    """``capi tail --follow --json -n 1`` in a process of its own; its lines go ``into``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    full.update({f"CAPI_{k.upper()}": str(v) for k, v in plain_settings(settings).items()})
    full.update({**env, "CAPI_CONFIG_FILE": os.devnull})
    proc = spawn(
        [sys.executable, "-m", "workers.cli", "tail", "--follow", "--json", "-n", "1"],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            into.append(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    return proc


def shards_on_enqueue(settings: Settings, cluster: ClusterSet, count: int) -> dict[int, list[str]]:
    """Enqueue 5 events to each destination; which shard each one's keys went to."""
    with SyncProducer.from_settings(settings) as producer:
        for name in names(count):
            assert producer.enqueue_many(events(5, prefix=f"{name}-"), destination=name).ok
    return shards_of(cluster, settings, count)


def test_the_keys_of_one_destination_share_a_slot() -> None:
    keys = RedisKeys("capi", "shop", cluster=True)
    slots = {
        redis.cluster.key_slot(k.encode())
        for k in (keys.stream, keys.retry, keys.stats, keys.deadletters, keys.armed, keys.tail)
    }
    assert len(slots) == 1
    assert keys.stream == "capi:d:{shop}:events"
    assert RedisKeys("capi", "shop").stream == "capi:d:shop:events"  # one Redis: as before
    assert RedisKeys("capi").stream == "capi:events"
    shared = {redis.cluster.key_slot(k.encode()) for k in (keys.active, keys.wake, keys.workers)}
    assert len(shared) == 1
    assert enqueue_call(keys, 60, [])[0][2:] == [keys.armed, keys.armed]


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"redis_sentinels": "127.0.0.1:26379", "redis_sentinel_master": "m"}, "exclude"),
        ({"redis_url": "unix:///tmp/redis.sock"}, "redis:// or rediss://"),
        ({"redis_url": "redis://127.0.0.1:7000/3"}, "database 0"),
        ({"redis_prefix": "capi{x}"}, "must not hold {"),
    ],
)
def test_cluster_settings_that_cannot_work_are_refused(
    overrides: dict[str, str], says: str
) -> None:
    values = {"redis_url": "redis://127.0.0.1:7000/0", "redis_cluster": True, **overrides}
    with pytest.raises(ConfigError, match=re.escape(says)):
        Settings.load(os.devnull, **values)


def test_a_producer_with_no_cluster_node_reachable_gets_queue_unavailable() -> None:
    """As without a cluster (tests/test_producer.py): capi's own error, saying where and
    what to check, not redis-py's ConnectionError (the sync client reads the topology when
    it is made, so that is where it came from)."""
    port = free_port()  # nothing listens there
    settings = Settings.load(
        os.devnull, redis_url=f"redis://127.0.0.1:{port}/0", redis_cluster=True, redis_timeout_s=1
    )
    says = rf"127\.0\.0\.1:{port}.*not queued.*CAPI_REDIS_CLUSTER_NODES"
    with (
        pytest.raises(QueueUnavailable, match=says.replace("not queued", "nothing was queued")),
        SyncProducer.from_settings(settings) as producer,
    ):
        producer.enqueue(events(1)[0])

    async def enqueue_async() -> None:
        async with Producer.from_settings(settings) as producer:
            await producer.enqueue(events(1)[0])

    with pytest.raises(QueueUnavailable, match=says):
        asyncio.run(enqueue_async())


def test_a_producer_with_no_cluster_node_reachable_names_each_node_once() -> None:
    """The URL's node listed again in CAPI_REDIS_CLUSTER_NODES (as one may, to list them
    all) was named twice in the error: 'the Redis Cluster of A,A,B'."""
    port, other = free_port(), free_port()  # nothing listens there
    settings = Settings.load(
        os.devnull,
        redis_url=f"redis://127.0.0.1:{port}/0",
        redis_cluster=True,
        redis_cluster_nodes=f"127.0.0.1:{port},127.0.0.1:{other}",
        redis_timeout_s=1,
    )
    nodes = ",".join(sorted([f"127.0.0.1:{port}", f"127.0.0.1:{other}"]))
    with pytest.raises(QueueUnavailable) as raised:
        SyncProducer.from_settings(settings)
    assert f"Redis at the Redis Cluster of {nodes} could not be reached" in str(raised.value)


def test_arq_refuses_a_cluster_and_names_capi_worker() -> None:
    settings = Settings.load(os.devnull, redis_url="redis://127.0.0.1:7000", redis_cluster=True)
    with pytest.raises(ConfigError, match="capi worker"):
        worker_settings(settings)


def test_the_intake_enqueues_to_a_cluster(
    tmp_path: Path, sandbox: SandboxThread, cluster: ClusterSet
) -> None:
    """``capi serve`` on a cluster, with ``replica`` durability: each answered event is
    delivered by a worker."""
    intake = start_intake(
        tmp_path,
        cluster.url,
        CAPI_REDIS_CLUSTER="true",
        CAPI_ENQUEUE_DURABILITY="replica",
        CAPI_PIXEL_ID=DEFAULT_PIXEL,
        CAPI_API_KEY=DEFAULT_KEY,
    )
    sent = events(30, prefix="http-")
    for event in sent:
        answer = intake.post([event])
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0]["status"] == "queued"
    settings = cluster_settings(sandbox, cluster)
    worker = start_worker(settings, "--burst")
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, output
    assert {e["id"] for e in sent} <= set(sandbox.state.delivered_ids())

    # Readiness reads every master: one full costs only its destinations (ready, degraded,
    # no address shown); all of them full is not ready.
    masters = cluster.masters()
    assert http_get(intake.url + "/readyz") == (200, '{"status": "ready"}')
    # Under replica durability a master whose replica confirms nothing costs only its
    # destinations too (it read the replication of one Redis only, never of a cluster).
    port = int(masters[0].info("replication")["slave0"]["port"])
    replica = next(n for n in cluster.nodes if n.port == port)
    assert replica.proc is not None
    os.kill(replica.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: "1 of the 3 masters" in http_get(intake.url + "/readyz")[1], 30, "1 down")
        replicated = settings.model_copy(update={"enqueue_durability": "replica"})
        shown = capi(replicated, "status").stdout
        assert "NO REPLICA CONFIRMS WRITES on 1 of the 3 masters" in shown, shown
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)
    wait_for(lambda: http_get(intake.url + "/readyz")[0] == 200, 30, "ready")
    wait_for(lambda: "degraded" not in http_get(intake.url + "/readyz")[1], 30, "all confirm")
    with masters[0].client() as c:
        c.config_set("maxmemory", 1)
    status, body = http_get(intake.url + "/readyz")
    assert status == 200 and "1 of the 3 masters" in body, body
    assert str(masters[0].port) not in body
    for node in masters[1:]:
        with node.client() as c:
            c.config_set("maxmemory", 1)
    status, body = http_get(intake.url + "/readyz")
    assert status == 503, body
    assert "every master of the Redis Cluster is full (maxmemory reached under noeviction)" in body
    for node in masters:
        with node.client() as c:
            c.config_set("maxmemory", 0)
    assert http_get(intake.url + "/readyz")[0] == 200
    log = intake.stop()
    assert "Traceback" not in log, log


def test_the_intake_groups_concurrent_requests_node_by_node(
    tmp_path: Path, sandbox: SandboxThread, cluster: ClusterSet
) -> None:
    """While the master of a destination holds its writes, requests for it wait in that
    node's group; let go, they reach it in one script call (with one WAIT), and each is
    answered and delivered."""
    from tests.test_intake_grouping import calls, joined, post_all, waiting

    intake = start_intake(
        tmp_path,
        cluster.url,
        CAPI_REDIS_CLUSTER="true",
        CAPI_ENQUEUE_DURABILITY="replica",
        CAPI_REDIS_TIMEOUT_S="60",
    )
    settings = cluster_settings(sandbox, cluster)
    node = cluster.node_of(settings.keys.stream)
    try:
        assert intake.post(events(1, prefix="warm-")).json()["queued"] == 1
        with node.client() as client:
            scripts, waits = calls(client, "evalsha"), calls(client, "wait")
            client.execute_command("CLIENT", "PAUSE", 120_000, "WRITE")
            sent = events(30, prefix="grouped-")
            threads, answers = post_all(intake, [([e], TOKEN, None) for e in sent])
            wait_for(lambda: waiting(intake) == 30, 60, "every event to wait for its node")
            client.execute_command("CLIENT", "UNPAUSE")
            got = joined(threads, answers)
            round_trips = calls(client, "wait") - waits
            assert round_trips <= 2, round_trips  # the one held, then the rest together
            assert calls(client, "evalsha") - scripts == round_trips  # one destination
        assert [a.json()["results"][0]["status"] for a in got] == ["queued"] * 30
    finally:
        log = intake.stop()
    assert "Traceback" not in log, log
    worker = start_worker(settings, "--burst")
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, output
    assert {e["id"] for e in sent} <= set(sandbox.state.delivered_ids())


def test_a_destination_redis_refuses_fails_only_its_own_requests_on_its_node(
    tmp_path: Path, cluster: ClusterSet
) -> None:
    """The stream key of d0 holds a string, so its master refuses every write to it. While
    that master holds its writes, requests for d0 and for another destination it serves
    wait in its group; let go, only d0's requests fail: the other destination's are each
    answered queued (none answered an error with its event queued all the same)."""
    from tests.test_intake_grouping import joined, post_all, waiting

    names = [f"d{i}" for i in range(12)]
    path = tmp_path / "destinations.toml"
    path.write_text(
        "".join(
            f'[destinations.{n}]\npixel_id = "pix-{n}"\napi_key_env = "CAPI_KEY_ANY"\n'
            f'intake_tokens_sha256 = ["{tokens.digest(TOKEN)}"]\n\n'
            for n in names
        )
    )
    keys = {n: Settings(_env_file=None, redis_cluster=True).keys.for_destination(n) for n in names}
    node = cluster.node_of(keys["d0"].stream)
    neighbour = next(n for n in names[1:] if cluster.node_of(keys[n].stream).port == node.port)
    intake = start_intake(
        tmp_path,
        cluster.url,
        CAPI_REDIS_CLUSTER="true",
        CAPI_ENQUEUE_DURABILITY="replica",
        CAPI_DESTINATIONS_FILE=str(path),
        CAPI_KEY_ANY="sk-any",
        CAPI_REDIS_TIMEOUT_S="60",
    )
    try:
        for n in ("d0", neighbour):  # each destination's script loaded on the node
            assert intake.post(events(1, prefix=f"warm-{n}-"), destination=n).status_code == 200
        sent = events(10, prefix="near-")
        with node.client() as client:
            client.set(keys["d0"].stream, "not a stream")
            client.execute_command("CLIENT", "PAUSE", 120_000, "WRITE")
            requests = [([e], TOKEN, neighbour) for e in sent]
            requests += [(events(1, prefix=f"refused-{i}-"), TOKEN, "d0") for i in range(5)]
            threads, answers = post_all(intake, requests)
            wait_for(lambda: waiting(intake) == 15, 60, "every event to wait for its node")
            client.execute_command("CLIENT", "UNPAUSE")
            got = joined(threads, answers)
    finally:
        intake.stop()
    assert [a.status_code for a in got[10:]] == [500] * 5
    assert [a.status_code for a in got[:10]] == [200] * 10, [a.text for a in got[:10]]
    assert [a.json()["results"][0]["status"] for a in got[:10]] == ["queued"] * 10


# ---------------------------------------------------------------------------------------
# capi serve through a master killed under load.


def intake_destinations(
    tmp_path: Path, sandbox: SandboxThread, count: int
) -> tuple[Path, dict[str, str]]:
    """:func:`configure`'s destinations, each granted to the intake's test token."""
    path, env = configure(tmp_path, sandbox, count)
    grant = f'intake_tokens_sha256 = ["{tokens.digest(TOKEN)}"]'
    path.write_text(re.sub(r"^(base_url = .*)$", rf"\1\n{grant}", path.read_text(), flags=re.M))
    return path, env


def post_until_stopped(
    url: str,
    n: int,
    count: int,
    answers: list[tuple[int, str]],
    acked: set[str],
    stop: threading.Event,
) -> None:
    """One client: requests of 1 or 10 events to the destinations in turn, each sent again
    with the same ids while it is answered 503 (as docs/intake.md tells clients)."""
    with httpx.Client(timeout=30) as http:
        for k in range(1_000_000):
            batch = events(1 if k % 3 else 10, prefix=f"c{n}-{k}-")
            body = orjson.dumps({"events": batch})
            status = 503
            while status == 503 and not stop.is_set():
                answer = http.post(
                    f"{url}/v1/events",
                    content=body,
                    params={"destination": f"d{(n + k) % count}"},
                    headers={
                        "Authorization": f"Bearer {TOKEN}",
                        "Content-Type": "application/json",
                    },
                )
                status = answer.status_code
                answers.append((status, answer.text[:200]))
                if status == 503:
                    time.sleep(0.05)
            if status == 200:
                acked.update(r["id"] for r in answer.json()["results"] if r["status"] == "queued")
            if stop.is_set():
                return


@pytest.mark.parametrize("durability", ["memory", "replica"])
def test_the_intake_answers_through_a_master_killed_under_load(
    tmp_path: Path, sandbox: SandboxThread, cluster: ClusterSet, durability: str
) -> None:
    """Twelve clients post to ``capi serve`` while the master holding the index and some
    destinations is killed (kill -9), its replica promoted and the old master brought back:
    each request is answered 200 or 503 (sent again, same ids), never 500, nothing is left
    waiting, the log holds no traceback; under ``replica`` every acknowledged event is
    delivered."""
    from tests.test_intake_grouping import waiting

    count = 12
    path, env = intake_destinations(tmp_path, sandbox, count)
    settings = cluster_settings(sandbox, cluster, destinations_file=path, batch_size=200)
    intake = start_intake(
        tmp_path,
        cluster.url,
        CAPI_REDIS_CLUSTER="true",
        CAPI_ENQUEUE_DURABILITY=durability,
        CAPI_DESTINATIONS_FILE=str(path),
        **env,
    )
    victim = cluster.node_of(settings.keys.active)
    answers: list[tuple[int, str]] = []
    acked: set[str] = set()
    stop = threading.Event()
    clients = [
        threading.Thread(
            target=post_until_stopped,
            args=(intake.url, n, count, answers, acked, stop),
            daemon=True,
        )
        for n in range(12)
    ]
    try:
        for thread in clients:
            thread.start()
        wait_for(lambda: len(acked) >= 1000, 60, "events acknowledged before the kill")
        victim.kill()
        wait_for(lambda: len(cluster.masters()) == 3, 60, "a replica promoted")
        victim.start()  # back, as the new master's replica
        cluster.wait_ok(60)
        before = len(acked)
        wait_for(lambda: len(acked) >= before + 1000, 60, "events acknowledged after")
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)
    assert all(not t.is_alive() for t in clients)
    assert waiting(intake) == 0
    assert http_get(intake.url + "/readyz")[0] == 200
    log = intake.stop()
    statuses = {status for status, _ in answers}
    bad = [a for a in answers if a[0] not in (200, 503)][:3]
    assert statuses <= {200, 503}, f"{bad}; the intake's log ends:\n{log[-4000:]}"
    assert "Traceback" not in log, log[log.index("Traceback") - 300 :][:3000]
    if durability == "replica":
        worker = start_worker(settings, **env)
        wait_for(lambda: acked <= set(sandbox.state.delivered_ids()), 120, "every acked event")
        assert "Traceback" not in stop_worker(worker)


def test_a_topology_read_survives_the_nodes_it_asks_changing_under_it(
    cluster: ClusterSet,
) -> None:
    """redis-py reads the topology from one node after another, across awaits; a node
    dropped meanwhile (another call's connection error) made its next step raise
    "dictionary changed size during iteration" (a 500 at the intake, under a failover)."""
    silent = socket.create_server(("127.0.0.1", 0))  # takes connections, never answers
    port = silent.getsockname()[1]

    async def go() -> None:
        client = async_client(cluster.url, 0.5, cluster=True)
        try:
            await client.initialize()
            nodes = client.nodes_manager
            first = ClusterNode("127.0.0.1", port, PRIMARY, **nodes.connection_kwargs)
            nodes.startup_nodes = {first.name: first, **nodes.startup_nodes}
            reading = asyncio.create_task(nodes.initialize())
            await asyncio.sleep(0.2)  # the read waits on the silent node
            dropped = next(name for name in nodes.startup_nodes if name != first.name)
            nodes.startup_nodes.pop(dropped)  # as redis-py does on a connection error
            await reading  # read from the next node
            assert await client.set("after", "1")
            await first.disconnect()
        finally:
            await client.aclose()

    with silent:
        asyncio.run(go())


def test_a_node_connection_closed_under_a_replica_enqueue_is_a_connection_error(
    tmp_path: Path, sandbox: SandboxThread, cluster: ClusterSet
) -> None:
    """Under ``replica`` a cluster enqueue goes down one connection to the node (with its
    WAIT). When a failover closed that connection between the pool handing it out and the
    write, uvloop (capi serve) refused the write with a RuntimeError that went through, and
    the intake answered 500 (test_the_intake_answers_through_a_master_killed_under_load,
    under load). It is the dropped connection it is, which the enqueue sends again on a new
    one."""
    import uvloop

    settings = cluster_settings(sandbox, cluster, enqueue_durability="replica")

    async def go() -> None:
        async with Producer.from_settings(settings) as producer:
            assert await producer.enqueue(events(1, prefix="warm-")[0])
            (client,) = producer._nodes.values()  # the node's, for the pipeline and WAIT
            conn = await client.connection_pool.get_connection()
            conn._writer.transport.close()  # as the failover, once the pool handed it out
            await asyncio.sleep(0.01)
            with pytest.raises(redis.exceptions.ConnectionError, match="closed under"):
                await conn.send_packed_command(conn.pack_command("PING"))
            await client.connection_pool.release(conn)
            assert await producer.enqueue(events(1, prefix="after-")[0])

    uvloop.run(go())


def test_a_client_that_dropped_every_node_it_asks_reads_the_topology_again(
    cluster: ClusterSet,
) -> None:
    """redis-py drops a node from those it asks for the topology on each connection error
    and refills them only from a topology read: after a failover that failed one call on
    every master, it asked nobody ("Please provide at least one reachable node") for good.
    Both clients, blocking and asyncio, ask the last topology's nodes again."""
    blocking = sync_client(cluster.url, 1.0, cluster=True)
    try:
        blocking.nodes_manager.startup_nodes.clear()  # every master failed a call
        blocking.nodes_manager.initialize()
        assert blocking.set("blocking", "1")
    finally:
        blocking.close()

    async def go() -> None:
        client = async_client(cluster.url, 1.0, cluster=True)
        try:
            await client.initialize()
            client.nodes_manager.startup_nodes.clear()
            await client.nodes_manager.initialize()
            assert await client.set("asyncio", "1")
        finally:
            await client.aclose()

    asyncio.run(go())


def test_a_cluster_of_one_master_is_ready_and_has_a_status(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    """redis-py answers INFO of a one-master cluster bare (not by node): the memory and
    replication reads broke, /readyz was 503 for good and capi status a traceback."""
    with ClusterSet(tmp_path / "one", masters=1, replicas_each=0) as one:
        intake = start_intake(
            tmp_path,
            one.url,
            CAPI_REDIS_CLUSTER="true",
            CAPI_PIXEL_ID=DEFAULT_PIXEL,
            CAPI_API_KEY=DEFAULT_KEY,
        )
        assert http_get(intake.url + "/readyz") == (200, '{"status": "ready"}')
        assert intake.post(events(1, prefix="one-")).status_code == 200
        shown = capi(cluster_settings(sandbox, one), "status")
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
        assert "Traceback" not in intake.stop()


def test_status_names_the_full_master_of_a_cluster(tmp_path: Path, sandbox: SandboxThread) -> None:
    """A full master of a cluster was shown as the cluster's total memory "of maxmemory"
    the sum of the limits, "under ;" (no policy: the total has none), and "producers are
    refused", though only the destinations on that master are. It names the master now."""
    with ClusterSet(tmp_path / "one", masters=1, replicas_each=0) as one:
        settings = cluster_settings(sandbox, one)
        with one.nodes[0].client() as c:
            c.config_set("maxmemory", 1)  # full (noeviction, the default policy)
        try:
            shown = capi(settings, "status")
        finally:
            with one.nodes[0].client() as c:
                c.config_set("maxmemory", 0)
    assert shown.returncode == 0, shown.stderr
    [line] = [x for x in shown.stdout.splitlines() if "FULL" in x]
    assert f"FULL on 1 of the 1 masters ({one.nodes[0].address}: " in line, line
    assert "under ;" not in line and "producers are refused" not in line, line


def test_the_cluster_is_reached_when_the_node_the_url_names_is_gone(
    tmp_path: Path, sandbox: SandboxThread, cluster: ClusterSet
) -> None:
    """The master CAPI_REDIS_URL names is killed (its host lost) and its replica promoted:
    the cluster is whole, but a capi process started since read the topology from that node
    only, and every one (capi status, a producer, a worker) failed "Redis is not reachable"
    for as long as that node stayed down. CAPI_REDIS_CLUSTER_NODES names more nodes to read
    it from."""
    gone = cluster.nodes[0]  # the URL's node, a master
    assert gone.is_master()
    gone.kill()
    wait_for(lambda: len(cluster.masters()) == 3, 60, "a replica promoted")
    cluster.wait_ok(60)
    others = ",".join(n.address for n in cluster.nodes[1:])
    settings = cluster_settings(sandbox, cluster, redis_cluster_nodes=others)
    shown = capi(settings, "status", "--json")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert json.loads(shown.stdout)["redis"]["role"] == "cluster"
    with SyncProducer.from_settings(settings) as producer:
        assert producer.enqueue_many(events(2, prefix="sync-")).queued == 2

    async def produce() -> None:
        async with Producer.from_settings(settings) as producer:
            assert await producer.enqueue(events(1, prefix="async-")[0])

    asyncio.run(produce())
    worker = start_worker(settings, "--burst")
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, output
    assert {"sync-p-0", "sync-s-1", "async-p-0"} <= set(sandbox.state.delivered_ids())


def test_cluster_nodes_are_host_port_pairs_and_need_a_cluster() -> None:
    url = "redis://127.0.0.1:7000/0"
    nodes = "10.0.0.6:7000, [::1]:7001"
    found = Settings.load(os.devnull, redis_url=url, redis_cluster=True, redis_cluster_nodes=nodes)
    assert found.cluster_nodes == (("10.0.0.6", 7000), ("::1", 7001))
    with pytest.raises(ConfigError, match="must be host:port"):
        Settings.load(os.devnull, redis_url=url, redis_cluster=True, redis_cluster_nodes="10.0.0.6")
    with pytest.raises(ConfigError, match="CAPI_REDIS_CLUSTER=true"):
        Settings.load(os.devnull, redis_url=url, redis_cluster_nodes="10.0.0.6:7000")


def test_a_burst_gives_up_on_a_cluster_whose_node_of_its_keys_is_gone(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    """capi worker --burst gives up on a Redis that has not answered for
    CAPI_REDIS_TIMEOUT_S: on a cluster it asked one node (redis-py's default node), which
    went on answering while the master holding the burst's keys was gone (no replica to
    take over): the burst waited for it, and did not end."""
    with ClusterSet(tmp_path / "cluster", replicas_each=0) as found:
        settings = cluster_settings(sandbox, found, batch_size=20, redis_timeout_s=2)
        enqueue(settings, events(200))
        sandbox.state.faults = [Fault("latency", every=1, latency_ms=300)]
        worker = start_worker(settings, "--burst")
        wait_for(lambda: sandbox.state.summary()["batches"] >= 2, what="the first batches")
        gone = found.node_of(settings.keys.stream)
        gone.kill()
        try:
            output, _ = worker.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            output = worker.output()
            worker.kill()
            worker.communicate()
            raise AssertionError(f"still waiting after 60 s; its output:\n{output}") from None
    assert worker.returncode == 5, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: Redis at the Redis Cluster of "), output
    assert "--burst gave up after 2 s" in last and "queued events stay queued" in last
