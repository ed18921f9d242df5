"""Benchmark of ``capi serve`` under attack: legitimate single-event requests sent while an
attacker runs, for each attack the outside review used; the server's peak RSS meanwhile.

For each server (``guarded``: ``capi serve`` as shipped, uvicorn's httptools protocol with
the guard of :mod:`capi.intake.guard`; ``httptools`` and ``h11``: the same application
under uvicorn's own protocols, with uvicorn's limits set as tightly as it allows), each
attack runs in a process of its own while this process opens a new connection every 20 ms
and POSTs one event with a valid token (open loop: latency counts from the scheduled
time, so a stall is not hidden by sending less). A request not answered 200 within 10 s
counts as unanswered. The server's and the attacker's CPU (user + system, as a share of
one core) show where the machine's time went: on a machine of 2 cores an attacker that
keeps one busy slows everything on it, the legitimate client included. Starts its own redis-server.

    .venv/bin/python -m tests.benchmarks.attack_bench                  # guarded only
    .venv/bin/python -m tests.benchmarks.attack_bench --servers guarded,httptools,h11

Not a test: it prints a table (quoted in docs/intake-security.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import uvloop

from tests.conftest import free_port
from tests.helpers import events, http_get, wait_for
from tests.intake_helpers import TOKEN, intake_env, start_intake
from tests.redisproc import RedisProcess

DURATION_S = 6.0
LEGIT_EVERY_S = 0.02
ANSWER_WITHIN_S = 10.0
MAX_CONNECTIONS = 1000
LEGIT_SOURCE = "127.0.0.2"


def post_head(port: int, length: int, content_type: str = "application/json") -> bytes:
    return (
        f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


# -- attacks (each runs in a process of its own until killed) --------------------------


async def _forever(port: int, copies: int, one: Callable[[int], Awaitable[None]]) -> None:
    async def loop() -> None:
        while True:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                await one(port)
            await asyncio.sleep(0.005)

    await asyncio.gather(*(loop() for _ in range(copies)))


async def _open(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from ``source``: attackers come from 127.0.0.1, the legitimate client
    from 127.0.0.2 (another address, as real clients are not the attacker's)."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def header_bomb(port: int) -> None:
    """A 32 MB header value, 64 KiB at a time, then the end of the headers (the review:
    one of 120 MB cost 15 s of CPU, superlinear in its size)."""
    r, w = await _open(port)
    w.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Big: ")
    chunk = b"a" * 65536
    for _ in range(512):
        w.write(chunk)
        await w.drain()
    w.write(b"\r\nContent-Length: 0\r\n\r\n")
    await r.read()


async def slow_headers(port: int) -> None:
    """Headers a few bytes every half second, never finished."""
    r, w = await _open(port)
    w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    while not r.at_eof():
        w.write(b"X-A: b\r\n")
        await w.drain()
        await asyncio.sleep(0.5)


async def slow_body(port: int) -> None:
    """A valid token, Content-Length 4 MB, 3.9 MB sent, then nothing."""
    r, w = await _open(port)
    w.write(post_head(port, 4_000_000))
    chunk = b" " * 65536
    for _ in range(60):
        w.write(chunk)
        await w.drain()
    await r.read()  # held until the server answers or closes


async def idle_connection(port: int) -> None:
    """A connection that sends nothing."""
    r, _ = await _open(port)
    await r.read()


_BOMB = b"x\n" * 1_999_000  # 2M bad lines, under 4 MB


async def parse_bomb(port: int) -> None:
    """A valid token and a 4 MB NDJSON body of 2M bad lines, again and again."""
    r, w = await _open(port)
    w.write(post_head(port, len(_BOMB), "application/x-ndjson") + _BOMB)
    await w.drain()
    await r.readuntil(b"\r\n\r\n")
    w.close()


async def oversize(port: int) -> None:
    """A valid token and a 40 MB body (10x CAPI_INTAKE_MAX_BODY_BYTES), streamed."""
    r, w = await _open(port)
    w.write(post_head(port, 40_000_000))
    chunk = b" " * 65536
    for _ in range(611):
        w.write(chunk)
        await w.drain()
    await r.read()


ATTACKS: dict[str, tuple[Callable[[int], Awaitable[None]], int, str]] = {
    "none": (idle_connection, 0, "no attack"),
    "header_bomb": (header_bomb, 4, "4 loops of one 32 MB header"),
    "slow_headers": (slow_headers, 300, "300 connections, headers trickling"),
    "slow_body": (slow_body, 100, "100 x 4 MB bodies stalled at 3.9 MB"),
    "idle_flood": (idle_connection, 1500, "1,500 idle connections (limit 1,000)"),
    "parse_bomb": (parse_bomb, 2, "2 loops of 4 MB NDJSON, 2M bad lines"),
    "oversize": (oversize, 4, "4 loops of 40 MB bodies"),
}


def _attack_main(name: str, port: int) -> None:
    one, copies, _ = ATTACKS[name]
    if copies:
        uvloop.run(_forever(port, copies, one))


# -- the legitimate client -------------------------------------------------------------


async def legit(port: int, duration_s: float) -> tuple[list[float], int]:
    """Single-event POSTs on new connections every LEGIT_EVERY_S; latencies of those
    answered 200, and how many were not."""
    latencies: list[float] = []
    failed = 0
    start = time.perf_counter() + 0.05
    count = int(duration_s / LEGIT_EVERY_S)

    async def one(i: int) -> None:
        nonlocal failed
        due = start + i * LEGIT_EVERY_S
        body = orjson.dumps({"events": events(1, start=i, prefix=f"legit-{start}-")})
        try:
            async with asyncio.timeout(ANSWER_WITHIN_S):
                r, w = await _open(port, LEGIT_SOURCE)
                w.write(post_head(port, len(body)) + body)
                head = await r.readuntil(b"\r\n\r\n")
                w.close()
            ok = head.startswith(b"HTTP/1.1 200 ")
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            ok = False
        if ok:
            latencies.append(time.perf_counter() - due)
        else:
            failed += 1

    tasks = []
    for i in range(count):
        delay = start + i * LEGIT_EVERY_S - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return latencies, failed


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("nan")


def cpu_s(pid: int) -> float:
    """The CPU time (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PeakRss:
    """The peak resident memory of a process, sampled every 50 ms in a thread, and the CPU
    time it used meanwhile."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_mb, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.cpu_s = 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)
            except OSError:
                return
            self._stop.wait(0.05)

    def __enter__(self) -> PeakRss:
        self._cpu_at_start = cpu_s(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_s = cpu_s(self.pid) - self._cpu_at_start


# -- the servers -----------------------------------------------------------------------


def _serve_main(protocol: str, port: int) -> None:
    """The intake application under uvicorn's own ``protocol`` (httptools or h11), with
    uvicorn's limits as tight as it allows: the comparison for the guard."""
    import uvicorn

    from capi.intake.app import Intake
    from capi.settings import Settings

    settings = Settings.load()
    uvicorn.run(
        Intake(settings),
        host="127.0.0.1",
        port=port,
        http=protocol,
        loop="uvloop",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        limit_concurrency=MAX_CONNECTIONS,
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=16_384,
    )


class Server:
    """One server process for a run: ``guarded`` (capi serve) or a bare uvicorn protocol."""

    def __init__(self, kind: str, redis_url: str, workdir: Path) -> None:
        self.kind = kind
        if kind == "guarded":
            self._intake = start_intake(workdir, redis_url)
            self.pid = self._intake.proc.pid
            self.port = int(self._intake.url.rsplit(":", 1)[1])
            return
        self.port = free_port()
        env = intake_env(redis_url)
        code = (
            "from tests.benchmarks.attack_bench import _serve_main; "
            f"_serve_main({kind!r}, {self.port})"
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.pid = self._proc.pid
        url = f"http://127.0.0.1:{self.port}/healthz"
        wait_for(lambda: http_get(url)[0] == 200, what=f"{kind} to answer")

    def stop(self) -> None:
        if self.kind == "guarded":
            self._intake.proc.terminate()
            self._intake.proc.wait(30)
        else:
            self._proc.terminate()
            self._proc.wait(30)


def run_one(server: Server, attack: str) -> dict[str, Any]:
    proc = multiprocessing.get_context("spawn").Process(
        target=_attack_main, args=(attack, server.port), daemon=True
    )
    proc.start()
    try:
        time.sleep(1.5 if attack != "none" else 0.0)  # the attack builds up first
        attacker_at_start = cpu_s(proc.pid)
        with PeakRss(server.pid) as rss:
            latencies, failed = uvloop.run(legit(server.port, DURATION_S))
        attacker_cpu = cpu_s(proc.pid) - attacker_at_start
    finally:
        proc.kill()
        proc.join()
    time.sleep(1.0)  # let the server shed the attack's connections before the next run
    return {
        "server": server.kind,
        "attack": attack,
        "sent": len(latencies) + failed,
        "unanswered": failed,
        "p50_ms": pct(latencies, 0.5) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
        "max_ms": max(latencies, default=float("nan")) * 1000,
        "peak_rss_mb": rss.peak_mb,
        "server_cpu": rss.cpu_s / DURATION_S,
        "attacker_cpu": attacker_cpu / DURATION_S,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="guarded", help="guarded,httptools,h11")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis = RedisProcess(workdir).start()
        try:
            for kind in args.servers.split(","):
                for attack in args.attacks.split(","):
                    redis.client().flushall()
                    server = Server(kind, redis.url, workdir)
                    try:
                        rows.append(run_one(server, attack))
                    finally:
                        server.stop()
                    print(_row(rows[-1]), flush=True)
        finally:
            redis.kill()
    print()
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"a legitimate single-event POST every {LEGIT_EVERY_S * 1000:.0f} ms on a new "
        f"connection for {DURATION_S:.0f} s during each attack"
    )
    print(
        "| server | attack | sent | unanswered | p50 ms | p99 ms | max ms | peak RSS MB "
        "| server CPU | attacker CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_row(r))


def _row(r: dict[str, Any]) -> str:
    return (
        f"| {r['server']} | {ATTACKS[r['attack']][2]} | {r['sent']} | {r['unanswered']} | "
        f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['peak_rss_mb']:.0f} "
        f"| {r['server_cpu']:.0%} | {r['attacker_cpu']:.0%} |"
    )


if __name__ == "__main__":
    main()
