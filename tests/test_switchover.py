"""A switchover under CAPI_ENQUEUE_DURABILITY=replica is QueueUnavailable, which callers
retry, never ConfigError: the master a producer waits on becomes a replica mid-WAIT.
ConfigError is for what the operator must change, e.g. a Redis user that may not read the
fsync policy that ``aof`` depends on."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from capi.errors import ConfigError, QueueUnavailable
from capi.producer import SyncProducer
from capi.sandbox import SandboxThread
from tests.helpers import events, make_settings, wait_for
from tests.redisproc import RedisProcess
from tests.servers import ServerKind, redis_system, valkey


@pytest.mark.parametrize("kind", [valkey(), redis_system()], ids=lambda k: k.name)
def test_a_switchover_during_the_replica_wait_is_queue_unavailable_and_a_retry_lands(
    kind: ServerKind, tmp_path: Path, sandbox: SandboxThread
) -> None:
    if kind.missing:
        pytest.skip(f"{kind.name}: {kind.missing}")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    old = RedisProcess(
        tmp_path / "a", binary=kind.binary, extra_args=["--repl-diskless-sync-delay", "0"]
    )
    new = RedisProcess(tmp_path / "b", binary=kind.binary)
    with old, new:
        with new.client() as c:
            c.replicaof("127.0.0.1", old.port)
            wait_for(lambda: c.info("replication")["master_link_status"] == "up", what="sync")
        event = events(1)[0]
        settings = make_settings(
            sandbox,
            old.url,
            enqueue_durability="replica",
            durability_timeout_ms=20_000,
            redis_timeout_s=30,
        )
        raised: list[BaseException] = []

        def enqueue() -> None:
            try:
                with SyncProducer.from_settings(settings) as producer:
                    producer.enqueue(event)
            except BaseException as exc:
                raised.append(exc)

        new.freeze()  # its acknowledgement cannot come: the producer waits in WAIT
        thread = threading.Thread(target=enqueue)
        thread.start()
        try:
            with old.client() as c:
                wait_for(lambda: c.info("clients")["blocked_clients"] >= 1, what="WAIT")
                c.replicaof("127.0.0.1", new.port)  # the switchover: the old master steps down
            thread.join(60)
            new.thaw()
            with new.client() as c:
                c.replicaof("NO", "ONE")  # and the new one takes over
        finally:
            new.thaw()
            thread.join(60)
        assert len(raised) == 1
        assert isinstance(raised[0], QueueUnavailable), repr(raised[0])
        assert "enqueueing it again is safe" in str(raised[0]).lower()

        # The caller retries, on the new master: the event is there once.
        retry = make_settings(  # a loaded machine's replica may take seconds to acknowledge
            sandbox, new.url, enqueue_durability="replica", durability_timeout_ms=20_000
        )
        with old.client() as c:
            wait_for(lambda: c.info("replication")["master_link_status"] == "up", what="sync")
        with SyncProducer.from_settings(retry) as producer:
            producer.enqueue(event)
        with new.client() as c:
            assert c.xlen(retry.keys.stream) == 1


def test_aof_is_refused_clearly_when_capi_may_not_read_the_fsync_policy(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    kind = valkey()
    if kind.missing:
        pytest.skip(f"{kind.name}: {kind.missing}")
    with RedisProcess(tmp_path, persist=True, binary=kind.binary) as server:
        with server.client() as c:
            c.execute_command("ACL", "SETUSER", "capi", "on", ">pw", "~*", "&*", "+@all", "-config")
        url = f"redis://capi:pw@127.0.0.1:{server.port}/0"
        settings = make_settings(sandbox, url, enqueue_durability="aof")
        with SyncProducer.from_settings(settings) as producer, pytest.raises(ConfigError) as caught:
            producer.enqueue(events(1)[0])
    assert "+config|get" in str(caught.value)
    assert "CAPI_ENQUEUE_DURABILITY=aof" in str(caught.value)
