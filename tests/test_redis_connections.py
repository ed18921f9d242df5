"""One parser of CAPI_REDIS_URL for everything, TLS verified by default, and every key
under CAPI_REDIS_PREFIX (a Redis user limited to the prefix by an ACL works)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from capi.errors import QueueUnavailable
from capi.producer import SyncProducer
from capi.sandbox import SandboxThread
from capi.settings import Settings
from tests.conftest import free_port
from tests.helpers import capi, events, ids, make_settings, spawn, start_worker, wait_for
from tests.redisproc import RedisProcess

PASSWORD = "p@ss:w/rd%?#"  # every character a URL gives a meaning to
QUOTED = "p%40ss%3Aw%2Frd%25%3F%23"


def burst(settings: Settings) -> str:
    proc = start_worker(settings, "--burst")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    return output


def test_a_percent_encoded_password_means_the_same_to_every_part(
    tmp_path: Path, sandbox: SandboxThread
) -> None:
    with RedisProcess(tmp_path, extra_args=["--requirepass", PASSWORD], password=PASSWORD) as r:
        settings = make_settings(sandbox, f"redis://:{QUOTED}@127.0.0.1:{r.port}/0")
        evts = events(20)
        with SyncProducer.from_settings(settings) as producer:
            assert producer.enqueue_many(evts).queued == 20
        burst(settings)  # the worker reads the same URL the same way
        assert set(sandbox.state.delivered_ids()) == ids(evts)
        assert capi(settings, "status").returncode == 0
        from workers.main import worker_settings

        pool = worker_settings(settings)["redis_pool"]  # and so does arq's loop
        assert pool.connection_pool.connection_kwargs["password"] == PASSWORD


def test_a_url_ending_in_a_slash_works(own_url_redis: RedisProcess, sandbox: SandboxThread) -> None:
    settings = make_settings(sandbox, f"redis://127.0.0.1:{own_url_redis.port}/")
    with SyncProducer.from_settings(settings) as producer:
        producer.enqueue(events(1)[0])
    burst(settings)
    assert len(sandbox.state.delivered_ids()) == 1


@pytest.fixture
def own_url_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path) as server:
        yield server


# -- TLS ---------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A TLS-only redis-server whose certificate, from a private CA, names ``localhost``."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=capi test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=tmp_path)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", "server.key", "-out", "server.csr", cwd=tmp_path)  # fmt: skip
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.pem",
             cwd=tmp_path)  # fmt: skip
    port = free_port()
    proc = spawn(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            str(tmp_path / "server.pem"),
            "--tls-key-file",
            str(tmp_path / "server.key"),
            "--tls-ca-cert-file",
            str(tmp_path / "ca.pem"),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ca = tmp_path / "ca.pem"
        client = redis.Redis(host="localhost", port=port, ssl=True, ssl_ca_certs=str(ca))
        wait_for(lambda: _pings(client), 10, "TLS redis")
        client.close()
        yield port, ca
    finally:
        proc.terminate()
        proc.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.exceptions.RedisError, OSError):
        time.sleep(0.05)
        return False


def _enqueue(sandbox: SandboxThread, url: str) -> None:
    settings = make_settings(sandbox, url, redis_timeout_s=2.0)
    with SyncProducer.from_settings(settings) as producer:
        producer.enqueue(events(1)[0])


def test_rediss_verifies_the_certificate_and_host_name_by_default(
    tls_redis: tuple[int, Path], sandbox: SandboxThread
) -> None:
    port, ca = tls_redis
    _enqueue(sandbox, f"rediss://localhost:{port}/0?ssl_ca_certs={ca}")  # the private CA
    with pytest.raises(QueueUnavailable, match="certificate verify failed"):
        _enqueue(sandbox, f"rediss://localhost:{port}/0")  # a CA the system does not know
    with pytest.raises(QueueUnavailable, match=r"certificate verify failed|match"):
        _enqueue(sandbox, f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}")  # not its name
    _enqueue(sandbox, f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_check_hostname=false")


# -- every key under the prefix ------------------------------------------------------------------


def test_a_redis_user_limited_to_the_prefix_runs_everything(
    own_url_redis: RedisProcess, sandbox: SandboxThread
) -> None:
    with own_url_redis.client() as admin:
        admin.execute_command(
            "ACL", "SETUSER", "capi", "on", ">secret", "~tenant-a:*", "+@all", "-@dangerous",
            "+info", "+dbsize",
        )  # fmt: skip
    url = f"redis://capi:secret@127.0.0.1:{own_url_redis.port}/0"
    settings = make_settings(sandbox, url, redis_prefix="tenant-a")
    evts = events(30)
    with SyncProducer.from_settings(settings) as producer:
        producer.enqueue_many(evts)
    output = burst(settings)
    assert set(sandbox.state.delivered_ids()) == ids(evts)
    assert "NOPERM" not in output and "no-permission" not in output
    for command in (["status"], ["dead-letters", "list"]):
        result = capi(settings, *command)
        assert result.returncode == 0, (command, result.stderr)
    with own_url_redis.client() as admin:
        keys = [k.decode() for k in admin.scan_iter(count=1000)]
    assert keys and all(k.startswith("tenant-a:") for k in keys), keys


PACKED = [
    ("EVALSHA", "a" * 40, 2, "k1", "k2", b"\x00\xffraw", "ünïcode", 17, -3, b"v" * 10_000),
    ("CONFIG GET", "maxmemory"),  # a two-word command is split, as redis-py does
    ("ZADD", "z", 0.1, "m", 1e20, "n", float("inf"), "o"),
    ("SET", "k", memoryview(b"view")),
]


def test_async_clients_pack_commands_as_redis_py_does(tmp_path: Path) -> None:
    """capi's asyncio connections pack with hiredis (redis-py 5's asyncio client packs in
    Python): the bytes are redis-py's, a bool is refused as redis-py refuses it, and a real
    Redis reads back what was written."""
    import asyncio

    import redis.asyncio as aioredis

    from capi.redisconn import async_client

    with RedisProcess(tmp_path) as r:
        for url in (r.url, f"unix://{tmp_path}/none.sock"):
            pool = async_client(url, 1).connection_pool
            ours = pool.connection_class(**pool.connection_kwargs)
            kwargs = {k: v for k, v in pool.connection_kwargs.items() if k != "path"}
            theirs = aioredis.Connection(**kwargs)
            assert type(ours).pack_command is not aioredis.Connection.pack_command
            for args in PACKED:
                assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args))
            with pytest.raises(redis.exceptions.DataError, match="bool"):
                ours.pack_command("SET", "k", True)

        async def round_trip() -> list[object]:
            client = async_client(r.url, 5)
            try:
                await client.set("ünï", b"\x00\xff" * 5000)
                await client.zadd("z", {"m": 0.1})
                return [await client.get("ünï"), await client.zscore("z", "m")]
            finally:
                await client.aclose()

        assert asyncio.run(round_trip()) == [b"\x00\xff" * 5000, 0.1]


def test_a_write_to_a_connection_closed_under_it_is_a_connection_error(tmp_path: Path) -> None:
    """Redis killed while a connection is opened or used: uvloop refuses the write with a
    RuntimeError ("the handler is closed") that redis-py let through, and the intake
    answered 500 (test_intake_grouping's killed-mid-group test, one run in 15 under load).
    It is a ConnectionError: the call is sent again on a new connection."""
    import asyncio

    import uvloop

    from capi.redisconn import async_client

    async def go(url: str) -> bool:
        client = async_client(url, 1)
        try:
            conn = await client.connection_pool.get_connection()
            conn._writer.transport.close()  # type: ignore[union-attr]  # as Redis going away
            await asyncio.sleep(0.01)
            with pytest.raises(redis.exceptions.ConnectionError, match="closed under the call"):
                await conn.send_packed_command(conn.pack_command("PING"))
            await client.connection_pool.release(conn)
            return bool(await client.ping())  # a new connection
        finally:
            await client.aclose()

    with RedisProcess(tmp_path) as r:
        assert uvloop.run(go(r.url)) is True
