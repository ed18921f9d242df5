"""Power loss and failover, simulated for real: does every acknowledged enqueue survive?

**Power loss.** The server runs under ``strace``, which records each write to its AOF and
each ``fdatasync``/``fsync`` of it, in order. Producers enqueue (8 concurrent tasks, single
events and bulk calls of 5) until, at a random instant, the server is frozen (SIGSTOP) and
killed. The AOF is then cut back to what had been fsynced (the bytes written before the
start of the last fsync that completed: what a power loss keeps), and a fresh server loads
it. Every event whose enqueue returned must be in its stream.

strace prints a syscall's line when the syscall returns, before the thread goes on, so a
reply the server sent after an fsync comes after that fsync in the trace; a reply sent
before its data's fsync is exactly the loss the test looks for. Only the incremental AOF
file (``appendonly.aof.1.incr.aof``, automatic rewrites off) is cut: the base file and
manifest were written and fsynced at start-up, before any enqueue.

**Failover.** A master and its replica; producers enqueue to the master until, at a random
instant, it is killed (SIGKILL) and the replica is promoted (``REPLICAOF NO ONE``). Every
event whose enqueue returned must be on the new master.

Run it by hand for figures (several rounds, any kind and mode)::

    .venv/bin/python -m tests.powerloss --kind valkey --fsync everysec --durability memory
    .venv/bin/python -m tests.powerloss --kind valkey --fsync everysec --durability raw-waitaof
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import redis

from capi.errors import ConfigError, QueueUnavailable
from capi.producer import Producer
from capi.settings import Settings
from tests.conftest import free_port
from tests.helpers import events, spawn
from tests.redisproc import RedisProcess
from tests.servers import ServerKind, aof_kinds, redis_system

INCR_AOF = Path("appendonlydir") / "appendonly.aof.1.incr.aof"
TASKS = 8


@dataclass
class Outcome:
    """What one simulated crash kept of what was acknowledged."""

    acked: set[str] = field(default_factory=set)
    lost: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # ConfigError messages
    written: int = 0  # bytes written to the AOF (power loss only)
    synced: int = 0  # of which fsynced
    after_s: float = 0.0  # when the crash came

    def line(self) -> str:
        kept = f"AOF {self.synced}/{self.written} B fsynced, " if self.written else ""
        return (
            f"crash {self.after_s:.2f} s after the first ack: {len(self.acked)} acknowledged, "
            f"{kept}"
            f"{len(self.lost)} of them lost"
            + (f"; refused: {self.refused[0][:90]}" if self.refused else "")
        )


# -- the producers ---------------------------------------------------------------------------


async def _produce(url: str, durability: str, crash_after_s: float, crash: object) -> Outcome:
    """Enqueue from TASKS tasks until ``crash()`` stops Redis, ``crash_after_s`` after the first
    acknowledgement (a replica that has just synced may confirm its first WAIT only at its
    next once-a-second ACK, about 0.9 s in: a crash timed from the start could come first)."""
    outcome = Outcome(after_s=crash_after_s)
    first_ack = asyncio.Event()
    mode = "aof" if durability == "raw-waitaof" else durability
    settings = Settings(_env_file=None, redis_url=url, redis_timeout_s=1.0, enqueue_durability=mode)
    stopped = asyncio.Event()

    async def task(t: int) -> None:
        n = 0
        while not stopped.is_set():
            batch = events(1 if n % 2 else 5, start=n, prefix=f"pl{t}-")
            n += len(batch)
            try:
                if durability == "raw-waitaof":
                    await _raw_waitaof(producer, batch, outcome)
                elif len(batch) == 1:
                    await producer.enqueue(batch[0])
                    outcome.acked.add(batch[0]["id"])
                else:
                    report = await producer.enqueue_many(batch)
                    outcome.acked.update(batch[i]["id"] for i in report.added)
                if outcome.acked:
                    first_ack.set()
            except QueueUnavailable:
                if stopped.is_set():
                    return  # Redis is gone: what was acknowledged is what counts
                # Before the crash: not acknowledged (a replica a loaded machine slowed did
                # not confirm within the wait); the others go on. Ending the task here left
                # no producer, nothing acknowledged and a test with nothing to check.
            except ConfigError as exc:
                outcome.refused.append(str(exc))
                return

    async def crasher() -> None:
        # Nothing acknowledged in 30 s: crash all the same, and the test says so.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(first_ack.wait(), 30)
        await asyncio.sleep(crash_after_s)
        crash()  # type: ignore[operator]
        stopped.set()

    async with Producer.from_settings(settings) as producer:
        await asyncio.gather(crasher(), *(task(t) for t in range(TASKS)))
    return outcome


async def _raw_waitaof(producer: Producer, batch: list[dict[str, object]], out: Outcome) -> None:
    """What capi did before issue 18: the write, then WAITAOF 1 0 on the same connection,
    trusting its answer whatever appendfsync is (to show the server's part)."""
    pipe = producer.redis.pipeline(transaction=False)
    for event in batch:
        pipe.xadd("raw", {"i": str(event["id"])})
    pipe.execute_command("WAITAOF", 1, 0, 1000)
    try:
        answers = await pipe.execute()
    except redis.exceptions.RedisError as exc:
        raise QueueUnavailable(str(exc)) from None
    if answers[-1][0] >= 1:
        out.acked.update(str(e["id"]) for e in batch)


# -- power loss ------------------------------------------------------------------------------


def fsynced_length(trace: str) -> tuple[int, int]:
    """Bytes written to the traced file, and how many of them an fsync had covered: those
    written before the start of the last fsync that returned 0."""
    written = synced = 0
    started: dict[str, int] = {}
    for line in trace.splitlines():
        pid, _, call = line.partition(" ")
        call = call.lstrip()  # strace pads short pids: "4964  write(..."
        resumed = call.startswith("<... ")
        name = call[5:].split(" ", 1)[0] if resumed else call.split("(", 1)[0]
        result = None
        if not call.endswith("<unfinished ...>") and ") = " in call:
            result = int(call.rsplit(") = ", 1)[1].split()[0])
        if name in ("write", "writev", "pwrite64"):
            written += max(result or 0, 0)
        elif name in ("fdatasync", "fsync"):
            if not resumed:
                started[pid] = written
            if result == 0:
                synced = max(synced, started.pop(pid, 0))
    return written, synced


def power_loss(
    kind: ServerKind, workdir: Path, *, fsync: str, durability: str, seed: int
) -> Outcome:
    """One simulated power loss (see the module's docstring)."""
    crash_after_s = random.Random(seed).uniform(0.5, 2.5)
    port = free_port()
    trace, pidfile = workdir / "aof.trace", workdir / "server.pid"
    tracer = spawn(  # its process group is killed after a test, whatever happens
        ["strace", "-f", "-qq", "-y", "-e", "trace=write,writev,pwrite64,fdatasync,fsync",
         "-e", "signal=none", "-P", str(workdir / INCR_AOF), "-o", str(trace),
         kind.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--dir", str(workdir), "--appendonly", "yes", "--appendfsync", fsync,
         "--auto-aof-rewrite-percentage", "0", "--pidfile", str(pidfile)],
        env=kind.environ(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    pid = 0
    try:
        pid = _started(port, pidfile, tracer)
        url = f"redis://127.0.0.1:{port}/0"
        outcome = asyncio.run(
            _produce(url, durability, crash_after_s, lambda: os.kill(pid, signal.SIGSTOP))
        )
        os.kill(pid, signal.SIGKILL)  # the power goes; strace sees its tracee die and ends
        tracer.wait(30)
    finally:
        if tracer.poll() is None:
            if pid:
                os.kill(pid, signal.SIGKILL)
            tracer.kill()
            tracer.wait(30)
    outcome.written, outcome.synced = fsynced_length(trace.read_text())
    os.truncate(workdir / INCR_AOF, outcome.synced)
    with RedisProcess(workdir, persist=True, binary=kind.binary, env=kind.env) as fresh:
        outcome.lost = sorted(outcome.acked - _present(fresh))
    return outcome


def _started(port: int, pidfile: Path, tracer: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and tracer.poll() is None:
        try:
            with redis.Redis(port=port, socket_timeout=1) as client:
                if client.ping() and pidfile.exists() and pidfile.read_text().strip():
                    return int(pidfile.read_text())
        except (redis.exceptions.RedisError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the traced server did not start (exit {tracer.poll()})")


def _present(server: RedisProcess) -> set[str]:
    """Ids of the events in the default destination's stream (and the raw stream)."""
    keys = Settings(_env_file=None).keys
    present = set()
    with server.client() as client:
        for _, fields in client.xrange(keys.stream):
            present.add(orjson.loads(fields[b"e"])["id"])
        for _, fields in client.xrange("raw"):
            present.add(fields[b"i"].decode())
    return present


# -- failover --------------------------------------------------------------------------------


def failover(kind: ServerKind, workdir: Path, *, durability: str, seed: int) -> Outcome:
    """One master killed and its replica promoted (see the module's docstring)."""
    crash_after_s = random.Random(seed).uniform(0.5, 2.5)
    (workdir / "master").mkdir()
    (workdir / "replica").mkdir()
    master = RedisProcess(
        workdir / "master", binary=kind.binary, env=kind.env,
        extra_args=["--repl-diskless-sync-delay", "0"],
    )  # fmt: skip
    replica = RedisProcess(workdir / "replica", binary=kind.binary, env=kind.env)
    with master, replica:
        with replica.client() as client:
            client.replicaof("127.0.0.1", master.port)
            deadline = time.monotonic() + 20
            while client.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise RuntimeError("the replica did not sync")
                time.sleep(0.05)
        outcome = asyncio.run(_produce(master.url, durability, crash_after_s, master.kill))
        with replica.client() as client:
            client.replicaof("NO", "ONE")
        outcome.lost = sorted(outcome.acked - _present(replica))
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="valkey", help="valkey, redis-7.4 or redis-7.0")
    parser.add_argument("--fsync", default="everysec", help="the server's appendfsync")
    parser.add_argument(
        "--durability", default="aof", help="memory, aof, replica (failover) or raw-waitaof"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    kind = {k.name: k for k in [*aof_kinds(), redis_system()]}[args.kind]
    if kind.missing:
        raise SystemExit(f"{kind.name}: {kind.missing}")
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            if args.durability == "replica":
                outcome = failover(kind, Path(tmp), durability="replica", seed=args.seed + r)
                what = "failover"
            else:
                outcome = power_loss(
                    kind, Path(tmp), fsync=args.fsync, durability=args.durability,
                    seed=args.seed + r,
                )  # fmt: skip
                what = f"power loss, appendfsync {args.fsync}"
        print(f"{kind.name}, {args.durability}, {what}, seed {args.seed + r}: {outcome.line()}")


if __name__ == "__main__":
    main()
