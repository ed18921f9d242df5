"""Duplicates after kill -9 storms, against batch size and CAPI_CLAIM_IDLE_S.

    python -m tests.benchmarks.duplicates_bench            # the grid below (~3 minutes)
    python -m tests.benchmarks.duplicates_bench --quick    # two runs

Each run: N events queued; the sandbox answers every request after LATENCY_MS (it commits
the events first, as the API does, then answers), so a worker always has batches the API
has committed but whose answer it has not read. A worker is started and killed with
SIGKILL after 5-7 s (KILL_EVERY_S), KILLS times; then one last worker drains the queue (it takes the
killed workers' entries over once they have had no heartbeat for 10 s and have been idle
for CAPI_CLAIM_IDLE_S). The sandbox counts every event it accepted; duplicates are the
accepted events beyond one per id (the API dedups on id, so they cost requests, not
correctness). Printed: duplicates as a share of the events, and the time to deliver all.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time

import orjson
import redis

from tests.benchmarks.bench import (
    enqueue_bulk,
    reset,
    sample_events,
    sandbox_call,
    services,
)

LATENCY_MS = 1000
KILL_EVERY_S = (5.0, 7.0)  # each worker lives a random time in this range (seeded)
KILLS = 5
GRID = [(100, 5.0), (500, 5.0), (1000, 5.0), (100, 15.0), (500, 15.0), (1000, 15.0)]
QUICK = [(100, 5.0), (1000, 5.0)]


def storm(env: dict[str, str], worker_env: dict[str, str], rng: random.Random) -> None:
    """KILLS workers in turn, each killed with SIGKILL after KILL_EVERY_S (a worker takes
    ~2 s to start on this machine, and its key check waits LATENCY_MS too)."""
    for _ in range(KILLS):
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker"],
            env={**os.environ, **env, **worker_env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(rng.uniform(*KILL_EVERY_S))  # the storm's pace is the condition
        finally:
            proc.kill()
            proc.wait(10)


def drain(env: dict[str, str], worker_env: dict[str, str], n: int) -> None:
    """One last worker, until the sandbox has every event and Redis has none left (the
    killed workers' entries are taken over and re-sent), then SIGTERM. (A --burst worker
    may stop while those entries still wait to be taken over.)"""
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "worker"],
        env={**os.environ, **env, **worker_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        client = redis.Redis.from_url(env["CAPI_REDIS_URL"])
        while (
            client.xlen("capi:events")
            or client.zcard("capi:retry")
            or (sandbox_call(env, "/_sandbox/state")["accepted_unique"] < n)
        ):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the events were not all delivered within 300 s")
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(60)


def one_run(env: dict[str, str], n: int, batch: int, claim_idle_s: float) -> dict[str, float]:
    reset(env)
    enqueue_bulk(env, sample_events(n, f"dup-{batch}-{claim_idle_s}"))
    worker_env = {
        "CAPI_BATCH_SIZE": str(batch),
        "CAPI_CLAIM_IDLE_S": str(claim_idle_s),
        "CAPI_REQUEST_TIMEOUT_S": str(min(4.0, claim_idle_s / 2)),
    }
    latency = {"kind": "latency", "every": 1, "latency_ms": LATENCY_MS}
    sandbox_call(env, "/_sandbox/config", orjson.dumps({"faults": [latency]}))
    started = time.monotonic()
    storm(env, worker_env, random.Random(batch))
    sandbox_call(env, "/_sandbox/config", orjson.dumps({"faults": []}))
    drain(env, worker_env, n)
    elapsed = time.monotonic() - started
    state = sandbox_call(env, "/_sandbox/state")
    return {
        "batch": batch,
        "claim_idle_s": claim_idle_s,
        "events": n,
        "duplicates": state["duplicates"],
        "share_pct": round(100 * state["duplicates"] / n, 1),
        "per_kill": round(state["duplicates"] / KILLS),
        "all_delivered_s": round(elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two runs instead of six")
    parser.add_argument("--events", type=int, default=30_000)
    args = parser.parse_args()
    rows = []
    with services() as env:
        for batch, claim_idle_s in QUICK if args.quick else GRID:
            rows.append(one_run(env, args.events, batch, claim_idle_s))
            r = rows[-1]
            print(
                f"batch {r['batch']:>5}  claim idle {r['claim_idle_s']:>4} s  "
                f"duplicates {r['duplicates']:>6} ({r['share_pct']:>5} %, ~{r['per_kill']} per "
                f"kill)  all delivered after {r['all_delivered_s']} s",
                flush=True,
            )
    print(
        f"\n{KILLS} kills, one every {KILL_EVERY_S[0]}-{KILL_EVERY_S[1]} s; the endpoint "
        f"answers after {LATENCY_MS} ms; {args.events} events; CAPI_CONCURRENCY=2 (default)"
    )


if __name__ == "__main__":
    main()
