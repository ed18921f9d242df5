"""Fault campaign for ``capi worker --burst`` (exit 5 once Redis has not answered for
``CAPI_REDIS_TIMEOUT_S``), for real.

    python -m tests.benchmarks.burst_faults --out /tmp/run-burst

One valkey (AOF, ``appendfsync always``), a slow fake events endpoint in a thread (records
every delivered id; 400 ``invalid_event`` for ids ending ``-7``, so dead letters happen), two
destinations. Each scenario enqueues a fresh wave with ``capi enqueue`` (fanned out to both
destinations, with two lines that are no JSON, which must be refused: exit 4), then runs
``capi worker --burst`` under one fault: Redis SIGSTOPped shorter than the timeout, longer
(mid-drain and before the start), kill -9 of Redis (restarted from its AOF) quickly and
after longer than the timeout, kill -9 of the burst worker (restarted at once), two bursts
at once, CLIENT KILL, maxmemory. Each burst's exit code, time to exit, last line and whether
it said it drained are recorded. Then a worker without ``--burst`` drains what is left and
every event is accounted for: enqueued = delivered + dead-lettered, LOST = neither;
duplicate sends counted (at least once allows them). Exit 1 if any event was lost.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import orjson

from tests.benchmarks.intake_faults import PY, Server, endpoint_answer, environment, event, say
from tests.conftest import free_port

PIXELS = {"d1": "pix_1", "d2": "pix_2"}


class Endpoint:
    """The fake events endpoint, in a thread: waits ``delay_s`` per request."""

    def __init__(self, delay_s: float) -> None:
        self.delivered: collections.Counter[tuple[str, str]] = collections.Counter()
        self.requests = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
                pid = parse_qs(urlparse(self.path).query).get("pid", ["?"])[0]
                time.sleep(delay_s)
                status, reply, delivered = endpoint_answer(body, reject=True)
                if delivered:
                    with lock:
                        outer.requests += 1
                        for e in delivered:
                            outer.delivered[(pid, str(e.get("id")))] += 1
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        class Quiet(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a worker killed mid-request (kill -9) breaks the pipe: expected

        self.port = free_port()
        self.server = Quiet(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Campaign:
    def __init__(self, out: Path, wave: int, timeout_s: float) -> None:
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.wave = wave
        self.timeout_s = timeout_s
        self.redis = Server(out, "always", "redis").start()
        self.endpoint = Endpoint(0.2)
        dfile = out / "destinations.toml"
        dfile.write_text(
            "".join(
                f'[destinations.{d}]\npixel_id = "{p}"\napi_key_env = "CAPI_KEY_{d.upper()}"\n\n'
                for d, p in PIXELS.items()
            )
        )
        self.env = environment(self.redis.url, dfile, self.endpoint.port, "aof")
        self.env.update(
            CAPI_REDIS_TIMEOUT_S=f"{timeout_s:g}",
            CAPI_LOG_FORMAT="text",
            CAPI_BATCH_SIZE="25",
            CAPI_SHUTDOWN_TIMEOUT_S="5",
        )
        self.env.update({f"CAPI_KEY_{d.upper()}": f"conv-key-{d}-0123456789abcdef" for d in PIXELS})
        self.enqueued: set[str] = set()
        self.rows: list[dict[str, Any]] = []
        self.n = 0

    def enqueue(self, name: str) -> None:
        now = int(time.time() * 1000)
        lines = []
        for i in range(self.wave):
            eid = f"{name}-{i}"
            lines.append(orjson.dumps(event(eid, i % 3, now)))
            self.enqueued.add(eid)
            if i in (10, self.wave // 2):
                lines.append(b"{not json at all" if i == 10 else b"\x00\x01 binary")
        done = subprocess.run(
            [PY, "-m", "workers.cli", "enqueue", "--json", "--destination", "d1,d2"],
            env=self.env,
            input=b"\n".join(lines) + b"\n",
            capture_output=True,
            check=False,
        )
        summary = json.loads(done.stdout.decode().strip().splitlines()[-1])
        say("enqueue", name, "rc", done.returncode, summary)
        assert done.returncode == 4, done.stderr.decode()[-2000:]
        assert summary["refused"] == 2, summary
        assert summary["queued"] == 2 * self.wave, summary

    def burst(self, name: str) -> subprocess.Popen[bytes]:
        self.n += 1
        log = (self.logs / f"{self.n:02d}-{name}.log").open("wb")
        return subprocess.Popen(
            ["nice", "-n", "19", PY, "-m", "workers.cli", "worker", "--burst"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def record(self, name: str, proc: subprocess.Popen[bytes], t0: float, note: str = "") -> None:
        try:
            rc = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            note += " HUNG>120s, killed"
        took = time.time() - t0
        text = (self.logs / f"{self.n:02d}-{name}.log").read_text(errors="replace")
        last = text.strip().splitlines()[-1] if text.strip() else ""
        row = {
            "scenario": name,
            "rc": rc,
            "exit_after_s": round(took, 1),
            "queued_after": self.queued(),
            "tracebacks": text.count("Traceback"),
            "said_drained": "burst: nothing queued" in text,
            "last": last[:400],
            "note": note,
        }
        self.rows.append(row)
        say("burst", json.dumps(row))

    def queued(self) -> int:
        found = subprocess.run(
            [PY, "-m", "workers.cli", "status", "--json"],
            env=self.env,
            capture_output=True,
            check=False,
        )
        try:
            shown = json.loads(found.stdout)
        except ValueError:
            return -1
        return sum(
            int(s.get(k) or 0)
            for s in shown.get("destinations", {}).values()
            for k in ("queued", "in_flight", "retry_batches_scheduled")
        )

    def restart_redis(self, down_s: float) -> None:
        self.redis.signal(signal.SIGKILL)
        assert self.redis.proc is not None
        self.redis.proc.wait()
        time.sleep(down_s)
        self.redis.start()

    # --- scenarios -------------------------------------------------------------------------

    def plain(self) -> None:
        self.enqueue("s0")
        t0 = time.time()
        self.record("no_fault", self.burst("no_fault"), t0)

    def short_stop(self) -> None:
        self.enqueue("s1")
        t0 = time.time()
        p = self.burst("sigstop_short")
        time.sleep(3)
        self.redis.signal(signal.SIGSTOP)
        time.sleep(self.timeout_s * 0.5)
        self.redis.signal(signal.SIGCONT)
        self.record("sigstop_short", p, t0, f"SIGSTOP {self.timeout_s * 0.5:g}s at 3s")

    def long_stop(self) -> None:
        self.enqueue("s2")
        t0 = time.time()
        p = self.burst("sigstop_long")
        time.sleep(3)
        self.redis.signal(signal.SIGSTOP)
        stopped = time.time()
        frozen = self.timeout_s * 4
        exited_frozen = None
        while time.time() - stopped < frozen:
            if p.poll() is not None and exited_frozen is None:
                exited_frozen = time.time() - stopped
            time.sleep(0.2)
        self.redis.signal(signal.SIGCONT)
        when = "after SIGCONT" if exited_frozen is None else f"{exited_frozen:.1f}s into it"
        note = f"SIGSTOP {frozen:g}s at 3s; exited {when}"
        self.record("sigstop_long", p, t0, note)

    def frozen_at_start(self) -> None:
        self.enqueue("s3")
        self.redis.signal(signal.SIGSTOP)
        t0 = time.time()
        p = self.burst("sigstop_at_start")
        exited = None
        while time.time() - t0 < self.timeout_s * 5:
            if p.poll() is not None:
                exited = time.time() - t0
                break
            time.sleep(0.2)
        self.redis.signal(signal.SIGCONT)
        self.record("sigstop_at_start", p, t0, f"frozen; exited {exited and round(exited, 1)}s in")

    def kill_burst(self) -> None:
        self.enqueue("s4")
        t0 = time.time()
        p = self.burst("burst_kill9")
        time.sleep(3)
        p.kill()
        self.record("burst_kill9", p, t0, "kill -9 at 3s")
        t0 = time.time()
        self.record("burst_after_kill9", self.burst("burst_after_kill9"), t0)

    def redis_kill_quick(self) -> None:
        self.enqueue("s5")
        t0 = time.time()
        p = self.burst("redis_kill9_quick")
        time.sleep(3)
        self.restart_redis(0.2)
        self.record("redis_kill9_quick", p, t0, "redis kill -9 at 3s, back 0.2s later")

    def redis_kill_long(self) -> None:
        self.enqueue("s6")
        t0 = time.time()
        p = self.burst("redis_kill9_long")
        time.sleep(3)
        self.restart_redis(self.timeout_s * 3)
        self.record(
            "redis_kill9_long", p, t0, f"redis kill -9 at 3s, back {self.timeout_s * 3:g}s later"
        )

    def two_bursts(self) -> None:
        self.enqueue("s7")
        t0 = time.time()
        a, b = self.burst("two_a"), None
        b = self.burst("two_b")
        time.sleep(3)
        self.redis.signal(signal.SIGSTOP)
        time.sleep(self.timeout_s * 2)
        self.redis.signal(signal.SIGCONT)
        self.n -= 1
        self.record("two_a", a, t0, "two at once; SIGSTOP 2x timeout at 3s")
        self.n += 1
        self.record("two_b", b, t0, "")

    def client_kill(self) -> None:
        self.enqueue("s8")
        t0 = time.time()
        p = self.burst("client_kill")
        time.sleep(2)
        with self.redis.client() as c:
            for _ in range(4):
                c.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
                time.sleep(1)
        self.record("client_kill", p, t0, "CLIENT KILL TYPE normal x4, 1s apart, from 2s")

    def maxmemory(self) -> None:
        self.enqueue("s9")
        t0 = time.time()
        p = self.burst("maxmemory")
        time.sleep(2)
        with self.redis.client() as c:
            c.config_set("maxmemory-policy", "noeviction")
            used = int(c.info("memory")["used_memory"])
            c.config_set("maxmemory", str(max(1, used - 1_000_000)))
            time.sleep(6)
            c.config_set("maxmemory", "0")
        self.record("maxmemory", p, t0, "maxmemory 1 MB under use for 6s, from 2s")

    def final(self) -> None:
        self.n += 1
        log = (self.logs / f"{self.n:02d}-final_worker_sigterm.log").open("wb")
        p = subprocess.Popen(
            ["nice", "-n", "19", PY, "-m", "workers.cli", "worker"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 300
        while time.time() < deadline:
            left = self.queued()
            say("final drain: busy", left)
            if left == 0:
                break
            time.sleep(3)
        time.sleep(2)
        p.terminate()
        t0 = time.time()
        self.record("final_worker_sigterm", p, t0)

    def account(self) -> int:
        found = subprocess.run(
            [PY, "-m", "workers.cli", "dead-letters", "list", "--json"],
            env=self.env,
            capture_output=True,
            check=False,
        )
        (self.out / "deadletters.jsonl").write_bytes(found.stdout)
        dead: dict[tuple[str, str], str] = {}
        for line in found.stdout.decode().splitlines():
            if line.strip():
                o = json.loads(line)
                dead[(o["destination"], o["event"]["id"])] = o["reason"]
        by_pixel = {p: d for d, p in PIXELS.items()}
        delivered = {(by_pixel[p], e): n for (p, e), n in self.endpoint.delivered.items()}
        table: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        lost = []
        for eid in sorted(self.enqueued):
            for d in PIXELS:
                key = (d, eid)
                row = table[eid.split("-")[0]]
                row["enqueued"] += 1
                row["delivered"] += key in delivered
                row["dead_lettered"] += key in dead
                row["both"] += key in delivered and key in dead
                row["duplicate_sends"] += max(0, delivered.get(key, 0) - 1)
                if key not in delivered and key not in dead:
                    row["LOST"] += 1
                    lost.append(key)
        total: collections.Counter[str] = collections.Counter()
        for name, row in sorted(table.items()):
            print(f"{name:6s}", dict(row))
            total += row
        print("TOTAL ", dict(total))
        reasons = collections.Counter(dead.values())
        print("still queued", self.queued(), "dead letters by reason", dict(reasons))
        strays = sum(1 for _, e in delivered if e not in self.enqueued)
        print("delivered ids never enqueued", strays)
        for key in lost[:20]:
            print("  LOST", key)
        for r in self.rows:
            print(json.dumps(r))
        return len(lost)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--wave", type=int, default=1500, help="events per scenario")
    parser.add_argument("--timeout", type=float, default=3.0, help="CAPI_REDIS_TIMEOUT_S")
    parser.add_argument(
        "--scenarios",
        default="plain,short_stop,long_stop,frozen_at_start,kill_burst,redis_kill_quick,"
        "redis_kill_long,two_bursts,client_kill,maxmemory",
    )
    a = parser.parse_args()
    c = Campaign(Path(a.out), a.wave, a.timeout)
    try:
        for name in a.scenarios.split(","):
            say("scenario", name)
            getattr(c, name)()
        c.final()
        lost = c.account()
    finally:
        c.redis.stop()
    raise SystemExit(1 if lost else 0)


if __name__ == "__main__":
    main()
