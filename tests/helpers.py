"""Shared test helpers: settings for the sandbox, event factories, running a sender."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import redis

from capi.errors import QueueUnavailable
from capi.events import purchase, signup
from capi.producer import Producer, SyncProducer
from capi.sandbox import SandboxThread
from capi.sandbox.state import DEFAULT_KEY, DEFAULT_PIXEL
from capi.settings import Settings
from capi.worker.lanes import run_sender
from capi.worker.sender import Sender

_SPAWNED: list[subprocess.Popen[Any]] = []


def spawn(
    args: list[str], popen: type[subprocess.Popen[Any]] = subprocess.Popen, **kwargs: Any
) -> subprocess.Popen[Any]:
    """``subprocess.Popen`` (or ``popen``) for a process a test (or a function-scoped
    fixture) starts: in a process group of its own, stopped after the test whatever
    happened (the autouse fixture ``stop_spawned_processes`` in conftest calls
    ``stop_spawned``)."""
    proc = popen(args, start_new_session=True, **kwargs)
    _SPAWNED.append(proc)
    return proc


class LoggedProcess(subprocess.Popen[str]):
    """A process whose output (stdout and stderr together) goes to an unnamed temporary
    file instead of a pipe. A pipe that nobody reads until the process ends holds 64 KiB;
    then the process blocks on its next log line, and a test waiting for it to deliver
    waits in vain. ``communicate`` waits for the process and returns its whole output, as
    with a pipe; :meth:`output` reads what it wrote so far."""

    def __init__(self, args: list[str], **kwargs: Any) -> None:
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by communicate)
        # Appending: the child's writes go to the end whatever this side reads (pread).
        flags = fcntl.fcntl(self._log.fileno(), fcntl.F_GETFL)
        fcntl.fcntl(self._log.fileno(), fcntl.F_SETFL, flags | os.O_APPEND)
        self._final: str | None = None
        try:
            super().__init__(args, stdout=self._log, stderr=subprocess.STDOUT, **kwargs)
        except BaseException:
            self._log.close()
            raise

    def output(self) -> str:
        """What the process has written so far (all of it once it was reaped)."""
        if self._final is not None:
            return self._final
        fd = self._log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def communicate(
        self, input: str | None = None, timeout: float | None = None
    ) -> tuple[str, None]:
        """Wait for the process (``input`` is not supported); its whole output."""
        if input is not None:
            raise ValueError("LoggedProcess takes no input")
        self.wait(timeout)
        if self._final is None:
            self._final = self.output()
            self._log.close()
        return self._final, None


def stop_spawned() -> None:
    """SIGKILL the process group of each process ``spawn`` started that the test left
    running (its children too: ``capi serve --workers 2``), then reap it and close its pipes.
    A test that stopped its processes itself finds nothing to do here."""
    while _SPAWNED:
        proc = _SPAWNED.pop()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group outlives a leader that exited
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError, OSError):
            proc.communicate(timeout=10)


def terminate(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM ``proc`` and reap it; SIGKILL it if it is not gone within ``timeout_s``."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)


def start_worker(settings: Settings, *args: str, **env: str) -> LoggedProcess:
    """``capi worker`` in a process of its own, configured by ``settings``; stopped after
    the test if the test did not stop it (``spawn``)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    full_env.update(
        {f"CAPI_{name.upper()}": str(value) for name, value in _plain(settings).items()}
    )
    full_env.update(env)
    full_env["CAPI_CONFIG_FILE"] = os.devnull
    proc = spawn(
        [sys.executable, "-m", "workers.cli", "worker", *args], LoggedProcess, env=full_env
    )
    assert isinstance(proc, LoggedProcess)
    return proc


def stop_worker(proc: subprocess.Popen[str]) -> str:
    """SIGTERM a worker; its whole output (it must exit 0)."""
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    return output


def http_get(url: str) -> tuple[int, str]:
    """Status and body of a GET (0 and "" when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def capi(
    settings: Settings,
    *args: str,
    input: str | None = None,
    timeout: float = 60,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a ``capi`` command configured by ``settings`` (and ``extra_env``: destinations'
    key variables); the completed process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    env.update({f"CAPI_{name.upper()}": str(value) for name, value in _plain(settings).items()})
    env.update(extra_env or {})
    env["CAPI_CONFIG_FILE"] = os.devnull
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _plain(settings: Settings) -> dict[str, Any]:
    data = settings.model_dump(exclude_none=True)
    data["api_key"] = settings.api_key.get_secret_value() if settings.api_key else ""
    if settings.advertiser_key is not None:
        data["advertiser_key"] = settings.advertiser_key.get_secret_value()
    return data


def make_settings(sandbox: SandboxThread, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_key": DEFAULT_KEY,
        "pixel_id": DEFAULT_PIXEL,
        "base_url": sandbox.url,
        "redis_url": redis_url,
        "retry_base_s": 0.01,
        "retry_cap_s": 0.05,
        "batch_wait_ms": 5,
        "claim_idle_s": 2.0,
        "reprobe_interval_s": 0.2,
        "request_timeout_s": 1.5,
        "shutdown_timeout_s": 5.0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def events(n: int, start: int = 0, prefix: str = "") -> list[dict[str, Any]]:
    out = []
    for i in range(start, start + n):
        if i % 2:
            out.append(
                signup(
                    f"{prefix}s-{i}",
                    email=f"user{i}@example.com",
                    source_url="https://shop.example/welcome",
                )
            )
        else:
            out.append(
                purchase(
                    f"{prefix}p-{i}",
                    amount=1000 + i,
                    currency="USD",
                    email=f"user{i}@example.com",
                    source_url="https://shop.example/thanks",
                )
            )
    return out


def ids(evts: list[dict[str, Any]]) -> set[str]:
    return {e["id"] for e in evts}


def enqueue(settings: Settings, evts: list[dict[str, Any]]) -> None:
    with SyncProducer.from_settings(settings) as producer:
        report = producer.enqueue_many(evts)
    assert report.ok, report.refused


def drain(settings: Settings, timeout_s: float = 60.0, **kwargs: Any) -> Sender:
    """Run a burst sender in this thread until everything has a fate."""

    async def go() -> Sender:
        sender = Sender.from_settings(settings, **kwargs)
        try:
            await asyncio.wait_for(run_sender(sender, burst=True), timeout_s)
        finally:
            await sender.aclose()
        return sender

    return asyncio.run(go())


def dead_letters(settings: Settings) -> dict[str, dict[str, Any]]:
    import orjson

    client = redis.Redis.from_url(settings.redis_url)
    raw = client.hgetall(settings.keys.deadletters)
    client.close()
    records = [orjson.loads(v) for v in raw.values()]
    return {r["id"]: r for r in records}  # by event id: the tests' ids are unique


def redis_dump(url: str) -> bytes:
    """Every key and value in Redis, as one blob to search for secrets."""
    client = redis.Redis.from_url(url)
    blob = bytearray()
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        blob += key + b"\n"
        if kind == b"string":
            blob += client.get(key) or b""
        elif kind == b"hash":
            for k, v in client.hgetall(key).items():
                blob += k + b"=" + v + b"\n"
        elif kind == b"zset":
            for m in client.zrange(key, 0, -1):
                blob += m + b"\n"
        elif kind == b"stream":
            for _, fields in client.xrange(key):
                for k, v in fields.items():
                    blob += k + b"=" + v + b"\n"
        elif kind == b"list":
            for v in client.lrange(key, 0, -1):
                blob += v + b"\n"
    client.close()
    return bytes(blob)


def read_http_answer(conn: socket.socket, timeout_s: float = 10.0) -> bytes:
    """A whole HTTP/1.1 answer from a raw socket: read until its headers and its
    Content-Length of body are in, or the server closes; AssertionError past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    answer = b""
    while True:
        head, blank, body = answer.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:[ \t]*(\d+)", head)
        if blank and length and len(body) >= int(length[1]):
            return answer
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no whole answer within {timeout_s} s: {answer[:300]!r}")
        conn.settimeout(left)
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            continue
        if not chunk:  # closed: what came is the answer
            return answer
        answer += chunk


def callers_behind_a_freeze(
    settings: Settings, freeze: Callable[[], None], callers: int
) -> list[tuple[str, float]]:
    """Open a producer (one pooled connection), ``freeze()`` Redis, then enqueue from
    ``callers`` concurrent callers: each one's outcome ("queued" or "unavailable") and the
    seconds from the freeze to its answer."""

    async def go() -> list[tuple[str, float]]:
        async with Producer.from_settings(settings) as producer:
            assert await producer.enqueue(events(1)[0])  # one pooled connection
            freeze()
            started = time.monotonic()

            async def one(event: dict[str, Any]) -> tuple[str, float]:
                try:
                    await producer.enqueue(event)
                    outcome = "queued"
                except QueueUnavailable:
                    outcome = "unavailable"
                return outcome, time.monotonic() - started

            return await asyncio.gather(*(one(e) for e in events(callers, start=1)))

    return asyncio.run(asyncio.wait_for(go(), 60))


def wait_for(predicate: Any, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def doom(
    settings: Settings, event_ids: set[str] | None = None, positions: list[int] | None = None
) -> list[str]:
    """Rewrite queued events so the API rejects them (an unknown data field), as if an older
    producer had queued them; select by id or by position in the stream. Returns their ids."""
    import orjson

    client = redis.Redis.from_url(settings.redis_url)
    entries = client.xrange(settings.keys.stream)
    chosen = [entries[p] for p in positions or []]
    chosen += [e for e in entries if event_ids and orjson.loads(e[1][b"e"])["id"] in event_ids]
    doomed = []
    for sid, fields in chosen:
        event = orjson.loads(fields[b"e"])
        event["data"]["coupon"] = "DOOMED"
        client.xadd(settings.keys.stream, {**fields, b"e": orjson.dumps(event)})
        client.xdel(settings.keys.stream, sid)
        doomed.append(event["id"])
    client.close()
    return doomed
