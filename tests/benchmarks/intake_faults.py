"""Fault campaign against the grouped HTTP intake on one Redis (valkey), for real.

    python -m tests.benchmarks.intake_faults --mode aof --out /tmp/run-aof
    python -m tests.benchmarks.intake_faults --mode replica --reject --out /tmp/run-replica \\
        --faults redis_sigstop,replica_sigstop,client_kill,endpoint_stop

One valkey (a replica too under ``--mode replica``; AOF on, ``appendfsync always`` except
under ``memory``: ``everysec``), a fake events endpoint (records every delivered id; with
``--reject`` it answers 400 ``invalid_event`` for ids ending ``-7``, so dead letters
happen), two ``capi serve`` and two ``capi worker`` processes, three destinations, and
``--threads`` clients sending single-event and multi-event requests (a 700-event one every
``--big-every`` requests, which takes two enqueue chunks) and sending a failed request again
half of the time. Each answer of every event is recorded. Faults, each in turn with
``--gap`` seconds between: ``redis_kill9`` (then restarted from its AOF), ``redis_sigstop``
(3.5 s), ``redis_stop_kill9`` (frozen 2.5 s, then killed), ``replica_sigstop``,
``maxmemory`` (1 MB under the memory in use, 5 s), ``client_kill`` (CLIENT KILL TYPE normal,
three times), ``worker_kill9`` / ``serve_kill9`` / ``serve_kill9_both`` (restarted after
3 s), ``endpoint_stop`` (down 30 s), ``endpoint_freeze`` (SIGSTOP 30 s). ``capi status
--json`` and ``/readyz`` are sampled every 2 s.

After the queue drains, the table per fault: events acknowledged (answered ``queued`` or
``duplicate``, in a 200 or a 503's results), delivered, dead-lettered, LOST (acknowledged,
neither), answered only errors and absent / present, duplicates at the endpoint; then
tracebacks in the logs. Exit 1 if any acknowledged event was lost.
"""

from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import orjson
import redis

from tests.conftest import free_port
from tests.servers import valkey

PY = sys.executable
TOKEN = "campaign-intake-token-000000000001"
PIXELS = {"d1": "pix_1", "d2": "pix_2", "d3": "pix_3"}
STATUS_EVERY_S = 2.0


def say(*parts: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


class Server:
    """A valkey-server of the campaign's own; kill -9, freeze, restart on the same port."""

    def __init__(self, work: Path, fsync: str, name: str, replicaof: int | None = None) -> None:
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.fsync, self.replicaof = fsync, replicaof
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        kind = valkey()
        assert not kind.missing, kind.missing
        args = ["nice", "-n", "19", kind.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--dir", str(self.dir), "--appendonly", "yes"]
        args += ["--appendfsync", self.fsync, "--auto-aof-rewrite-percentage", "0"]
        args += ["--logfile", str(self.dir / "server.log")]
        if self.replicaof:
            args += ["--replicaof", "127.0.0.1", str(self.replicaof)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(1500):
            try:
                with self.client(1) as c:
                    if c.ping():
                        return self
            except (redis.exceptions.RedisError, OSError):
                time.sleep(0.02)
        raise RuntimeError("valkey did not start")

    def client(self, timeout: float = 5) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=timeout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(30)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class Proc:
    """A process the campaign starts, kills and starts again; a log file per start."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.args, self.env, self.logs = name, args, env, logs
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Proc:
        self.starts += 1
        with (self.logs / f"{self.name}.{self.starts}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                ["nice", "-n", "19", *self.args], env=self.env, stdout=log, stderr=log
            )
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return None if self.proc is None else self.proc.returncode


def event(event_id: str, kind: int, now_ms: int) -> dict[str, Any]:
    user = {"email": f"{event_id}@example.com"}
    if kind == 0:
        return {
            "id": event_id,
            "type": "registration_completed",
            "timestamp_ms": now_ms,
            "action_source": "web",
            "source_url": "https://shop.example/welcome",
            "user": user,
            "data": {"type": "customer_action"},
        }
    return {
        "id": event_id,
        "type": "order_created",
        "timestamp_ms": now_ms,
        "action_source": "web",
        "source_url": "https://shop.example/thanks",
        "user": {**user, "phone": "+15551234567"},
        "data": {"type": "contents", "amount": 1299, "currency": "USD"},
    }


class Clients:
    """Client threads; each writes one JSON line per answer to ``client-N.jsonl``."""

    def __init__(self, urls: list[str], threads: int, out: Path, run: str, big_every: int):
        self.urls, self.threads, self.out, self.run = urls, threads, out, run
        self.big_every = big_every
        self.stopping = threading.Event()
        self.running: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.answers: collections.Counter[int] = collections.Counter()

    def start(self) -> None:
        for i in range(self.threads):
            thread = threading.Thread(target=self.loop, args=(i,), daemon=True)
            thread.start()
            self.running.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.running:
            thread.join(30)

    def loop(self, i: int) -> None:
        rnd = random.Random(i)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        with (
            (self.out / f"client-{i}.jsonl").open("ab") as record,
            httpx.Client(timeout=10) as client,
        ):
            seq = 0
            while not self.stopping.is_set():
                seq += 1
                n = 1 if rnd.random() < 0.7 else rnd.randint(2, 30)
                if self.big_every and seq % self.big_every == 0:
                    n = 700
                now = int(time.time() * 1000)
                events = [event(f"{self.run}-c{i}-{seq}-{k}", (seq + k) % 2, now) for k in range(n)]
                dest = rnd.choice(list(PIXELS))
                body = orjson.dumps({"events": events})
                for attempt in range(3):
                    url = self.urls[(seq + attempt + i) % len(self.urls)]
                    code = self.post(client, url, dest, body, headers, events, attempt, record)
                    if code == 200 or rnd.random() < 0.5:
                        break
                    time.sleep(rnd.uniform(0.3, 1.0))
                time.sleep(rnd.uniform(0.005, 0.03))

    def post(
        self,
        client: httpx.Client,
        url: str,
        dest: str,
        body: bytes,
        headers: dict[str, str],
        events: list[dict[str, Any]],
        attempt: int,
        record: Any,
    ) -> int:
        started = time.time()
        try:
            resp = client.post(
                f"{url}/v1/events", params={"destination": dest}, content=body, headers=headers
            )
            code, answer = resp.status_code, resp.json()
        except Exception as exc:  # a killed intake: no answer
            code, answer = 0, {"exc": type(exc).__name__}
        with self.lock:
            self.answers[code] += 1
        line: dict[str, Any] = {"t": started, "h": code, "d": dest, "n": len(events), "a": attempt}
        if answer.get("results"):
            line["r"] = [[x["id"], x["status"]] for x in answer["results"]]
        else:
            line["ids"] = [e["id"] for e in events]
        record.write(orjson.dumps(line) + b"\n")
        return code


def endpoint_answer(body: dict[str, Any], reject: bool) -> tuple[int, bytes, list[Any]]:
    """The fake endpoint's answer to a POST body: its status, its JSON, and the events it
    delivers (none for a ``validate_only`` probe or a refusal); with ``reject``, 400
    invalid_event for the first id ending -7."""
    events = body.get("events", [])
    probe = bool(body.get("validate_only"))
    bad = [i for i, e in enumerate(events) if reject and str(e.get("id")).endswith("-7")]
    if bad and not probe:
        at = f"events[{bad[0]}]"
        error = {
            "message": f"Invalid event at {at}. See errors for details.",
            "type": "invalid_request_error",
            "param": at,
            "code": "invalid_event",
            "errors": [
                {"message": "unknown field", "param": f"{at}.data.x", "code": "unknown_data_field"}
            ],
        }
        return 400, orjson.dumps({"error": error}), []
    return 200, orjson.dumps({"accepted_events": len(events)}), [] if probe else events


def serve_endpoint(port: int, out: str, reject: bool) -> None:
    """The fake events endpoint: 200 ``{"accepted_events": n}``, each delivered ``pid\\tid``
    appended to ``out``; with ``reject``, 400 invalid_event for the first id ending -7."""
    lock = threading.Lock()
    sink = Path(out).open("ab", buffering=0)  # noqa: SIM115 (open for the server's life)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
            pid = parse_qs(urlparse(self.path).query).get("pid", ["?"])[0]
            status, reply, delivered = endpoint_answer(body, reject)
            if delivered:
                with lock:
                    sink.write(b"".join(f"{pid}\t{e.get('id')}\n".encode() for e in delivered))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def environment(redis_url: str, dfile: Path, endpoint: int, mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    env.update(
        CAPI_CONFIG_FILE=os.devnull,
        CAPI_REDIS_URL=redis_url,
        CAPI_DESTINATIONS_FILE=str(dfile),
        CAPI_BASE_URL=f"http://127.0.0.1:{endpoint}",
        CAPI_ENQUEUE_DURABILITY=mode,
        CAPI_DURABILITY_TIMEOUT_MS="1000",
        CAPI_REDIS_TIMEOUT_S="2",
        CAPI_REQUEST_TIMEOUT_S="5",
        CAPI_CLAIM_IDLE_S="10",
        CAPI_RETRY_BASE_S="0.5",
        CAPI_RETRY_CAP_S="5",
        CAPI_INTAKE_RETRY_AFTER_S="1",
        CAPI_LOG_FORMAT="json",
    )
    env.update({f"CAPI_KEY_{d.upper()}": f"conv-key-{d}-0123456789abcdef" for d in PIXELS})
    return env


def sample_status(env: dict[str, str], readyz: str, rows: list[Any], done: threading.Event) -> None:
    while not done.is_set():
        started = time.time()
        try:
            found = subprocess.run(
                [PY, "-m", "workers.cli", "status", "--json"],
                env=env,
                capture_output=True,
                timeout=30,
                check=False,
            )
            rc, shown, err = found.returncode, found.stdout.decode(), found.stderr.decode()
        except subprocess.TimeoutExpired:
            rc, shown, err = -1, "", "TIMEOUT"
        try:
            ready = httpx.get(readyz, timeout=5)
            rz = [ready.status_code, ready.text[:200]]
        except httpx.HTTPError as exc:
            rz = [0, type(exc).__name__]
        took = time.time() - started
        rows.append({"t": started, "dt": took, "rc": rc, "out": shown, "err": err[-500:], "rz": rz})
        done.wait(max(0.0, STATUS_EVERY_S - took))


def drain(env: dict[str, str], limit_s: float) -> None:
    """Wait until no destination has queued, in-flight or scheduled events."""
    deadline = time.time() + limit_s
    while time.time() < deadline:
        found = subprocess.run(
            [PY, "-m", "workers.cli", "status", "--json"], env=env, capture_output=True, check=False
        )
        try:
            shown = json.loads(found.stdout)
            busy = sum(
                int(s.get(k) or 0)
                for s in shown.get("destinations", {}).values()
                for k in ("queued", "in_flight", "retry_batches_scheduled")
            )
        except ValueError:
            busy = -1
        say("drain: busy", busy)
        if busy == 0:
            return
        time.sleep(5)


def run(a: argparse.Namespace) -> dict[str, Any]:
    out = Path(a.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tag = f"{a.mode}{int(time.time()) % 100000}"
    master = Server(out, "everysec" if a.mode == "memory" else "always", "redis").start()
    replica = None
    if a.mode == "replica":
        replica = Server(out, "always", "replica", replicaof=master.port).start()
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    dfile = out / "destinations.toml"
    dfile.write_text(
        "".join(
            f'[destinations.{d}]\npixel_id = "{p}"\napi_key_env = "CAPI_KEY_{d.upper()}"\n'
            f'intake_tokens_sha256 = ["{digest}"]\n\n'
            for d, p in PIXELS.items()
        )
    )
    endpoint_port = free_port()
    env = environment(master.url, dfile, endpoint_port, a.mode)
    reject = "reject" if a.reject else "-"
    me = [PY, "-m", "tests.benchmarks.intake_faults"]
    endpoint = Proc(
        "endpoint",
        [*me, "endpoint", str(endpoint_port), str(out / "delivered.tsv"), reject],
        env,
        logs,
    ).start()
    ports = [free_port(), free_port()]
    serves = [
        Proc(f"serve{i}", [PY, "-m", "workers.cli", "serve", "--port", str(p)], env, logs).start()
        for i, p in enumerate(ports)
    ]
    workers = [
        Proc(f"worker{i}", [PY, "-m", "workers.cli", "worker"], env, logs).start() for i in range(2)
    ]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    for url in urls:
        for _ in range(300):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
    rows: list[Any] = []
    sampled = threading.Event()
    sampler = threading.Thread(
        target=sample_status, args=(env, urls[1] + "/readyz", rows, sampled), daemon=True
    )
    sampler.start()
    clients = Clients(urls, a.threads, out, tag, a.big_every)
    clients.start()
    say("load started", tag)

    def restart_master() -> None:
        master.signal(signal.SIGKILL)
        assert master.proc is not None
        master.proc.wait()
        time.sleep(0.5)
        master.start()

    def freeze(server: Server | None, seconds: float) -> None:
        assert server is not None, "replica_sigstop needs --mode replica"
        server.signal(signal.SIGSTOP)
        time.sleep(seconds)
        server.signal(signal.SIGCONT)

    def maxmemory() -> None:
        with master.client() as c:
            c.config_set("maxmemory-policy", "noeviction")
            used = int(c.info("memory")["used_memory"])
            c.config_set("maxmemory", str(max(1, used - 1_000_000)))
            time.sleep(5)
            c.config_set("maxmemory", "0")

    def client_kill() -> None:
        with master.client() as c:
            for _ in range(3):
                c.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
                time.sleep(1)

    def again(*procs: Proc, after: float = 3) -> None:
        for p in procs:
            p.kill9()
        time.sleep(after)
        for p in procs:
            p.start()

    def frozen(proc: Proc, seconds: float) -> None:
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        proc.proc.send_signal(signal.SIGCONT)

    def frozen_then_killed() -> None:
        master.signal(signal.SIGSTOP)
        time.sleep(2.5)
        restart_master()

    faults: dict[str, Callable[[], None]] = {
        "redis_kill9": restart_master,
        "redis_sigstop": lambda: freeze(master, 3.5),
        "redis_stop_kill9": frozen_then_killed,
        "replica_sigstop": lambda: freeze(replica, 3.5),
        "maxmemory": maxmemory,
        "client_kill": client_kill,
        "worker_kill9": lambda: again(workers[0]),
        "serve_kill9": lambda: again(serves[0]),
        "serve_kill9_both": lambda: again(*serves, after=2),
        "endpoint_stop": lambda: again(endpoint, after=30),
        "endpoint_freeze": lambda: frozen(endpoint, 30),
    }
    phases = []
    try:
        for name in a.faults.split(","):
            time.sleep(a.gap)
            started = time.time()
            say("fault", name)
            faults[name]()
            phases.append({"name": name, "t0": started, "t1": time.time()})
        time.sleep(a.gap)
    finally:
        clients.stop()
        load_end = time.time()
        say("load stopped; answers by HTTP status", dict(clients.answers))
        drain(env, a.drain)
        time.sleep(3)
        sampled.set()
        sampler.join(40)
        found = subprocess.run(
            [PY, "-m", "workers.cli", "dead-letters", "list", "--json"],
            env=env,
            capture_output=True,
            check=False,
        )
        (out / "deadletters.jsonl").write_bytes(found.stdout)
        codes = {p.name: p.stop() for p in [endpoint, *serves, *workers]}
        for server in (replica, master):
            if server is not None:
                server.stop()
    summary = {
        "run": tag,
        "phases": phases,
        "load_end": load_end,
        "answers": dict(clients.answers),
        "exit_codes": codes,
    }
    (out / "phases.json").write_text(json.dumps(summary, indent=1))
    (out / "status.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return summary


def analyse(out: Path) -> int:  # noqa: PLR0912
    """Print the table; the number of acknowledged events lost."""
    summary = json.loads((out / "phases.json").read_text())
    phases = summary["phases"]
    by_pixel = {p: d for d, p in PIXELS.items()}

    def phase_of(t: float) -> str:
        for i, p in enumerate(phases):
            end = phases[i + 1]["t0"] - 1 if i + 1 < len(phases) else summary["load_end"]
            if p["t0"] - 1 <= t < min(end, p["t1"] + 10):
                return f"{i}:{p['name']}"
        return "baseline"

    first: dict[tuple[str, str], float] = {}
    acked: set[tuple[str, str]] = set()
    answers: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for name in glob.glob(str(out / "client-*.jsonl")):
        for raw in Path(name).read_bytes().splitlines():
            r = orjson.loads(raw)
            for eid, status in r.get("r") or [[i, "error"] for i in r["ids"]]:
                key = (r["d"], eid)
                first[key] = min(first.get(key, r["t"]), r["t"])
                answers[key].add(f"{r['h']}:{status}")
                if status in ("queued", "duplicate"):
                    acked.add(key)
    delivered: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in (out / "delivered.tsv").read_text().splitlines():
        pid, eid = line.split("\t")
        delivered[(by_pixel.get(pid, pid), eid)] += 1
    dead = {}
    for line in (out / "deadletters.jsonl").read_text().splitlines():
        if line.strip():
            o = json.loads(line)
            dead[(o["destination"], o["event"]["id"])] = o["reason"]
    table: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    lost = []
    for key, t in first.items():
        row = table[phase_of(t)]
        row["events"] += 1
        present = delivered[key] > 0 or key in dead
        if key in acked:
            row["acknowledged"] += 1
            row["delivered"] += delivered[key] > 0
            row["dead_lettered"] += key not in delivered and key in dead
            if not present:
                row["LOST"] += 1
                lost.append(key)
        else:
            row["errors_only_present" if present else "errors_only_absent"] += 1
        row["duplicate_sends"] += max(0, delivered[key] - 1)
    print("run", summary["run"], "answers by HTTP status", summary["answers"])
    print("exit codes", summary["exit_codes"])
    total: collections.Counter[str] = collections.Counter()
    for name in ["baseline"] + [f"{i}:{p['name']}" for i, p in enumerate(phases)]:
        print(f"{name:20s}", dict(table[name]))
        total += table[name]
    print(f"{'TOTAL':20s}", dict(total))
    print("dead letters by reason", dict(collections.Counter(dead.values())))
    print("delivered ids no client sent", sum(1 for k in delivered if k not in first))
    honest = collections.Counter(
        tuple(sorted(answers[k])) for k in first if k not in acked and (delivered[k] or k in dead)
    )
    print("answered only errors yet present, by answers", dict(honest))
    for key in sorted(lost, key=first.__getitem__)[:20]:
        print("  LOST", key, phase_of(first[key]), sorted(answers[key]))
    for name in sorted(glob.glob(str(out / "logs/*.log"))):
        text = Path(name).read_text(errors="replace")
        print("log", Path(name).name, "tracebacks", text.count("Traceback"))
    return len(lost)


def main() -> None:
    if sys.argv[1:2] == ["endpoint"]:
        serve_endpoint(int(sys.argv[2]), sys.argv[3], sys.argv[4] == "reject")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="aof", choices=["memory", "aof", "replica"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=12)
    parser.add_argument(
        "--faults",
        default="redis_kill9,redis_sigstop,maxmemory,client_kill,worker_kill9,serve_kill9,"
        "endpoint_stop",
    )
    parser.add_argument("--gap", type=float, default=8)
    parser.add_argument("--drain", type=float, default=240)
    parser.add_argument("--big-every", type=int, default=150)
    parser.add_argument("--reject", action="store_true")
    parser.add_argument("--analyse-only", action="store_true")
    a = parser.parse_args()
    if not a.analyse_only:
        run(a)
    sys.exit(1 if analyse(Path(a.out)) else 0)


if __name__ == "__main__":
    main()
