"""capi console at size: 1,000 destinations, 100,000 dead letters.

    PYTHONPATH=. .venv/bin/python -m tests.benchmarks.console_bench
    PYTHONPATH=. .venv/bin/python -m tests.benchmarks.console_bench --dead-letters 10000

Starts its own redis-server and a real ``capi console`` process, writes a destinations file
of 1,000 destinations, fills Redis as busy workers would leave it (counters, key states, a
few queued events and dedup records each, some held keys and failing endpoints) and
100,000 dead letters in
one destination, then times the answers over loopback HTTP (a Bearer token, so each
request reads the session-free path): the overview of every destination, and pages of the
dead-letter list (the first, one deep in the list, one filtered by reason, a search by id).
Prints the median and the 95th percentile of ROUNDS requests each; the target is 300 ms.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

from capi.console import auth
from capi.constants import CONSUMER_GROUP
from capi.failures import Reason
from capi.settings import Settings
from tests.benchmarks.destinations_bench import (
    CONFIGURED,
    key_env,
    name,
    redis_server,
    write_destinations,
)
from tests.console_helpers import seed_dead_letters

ROUNDS = 30
DEDUP_KEYS = 64  # per destination: the keyspace the overview's scan for removed ones walks
TARGET_MS = 300
REASONS = [Reason.MISSING_SCOPE, Reason.INVALID_EVENT, Reason.RETRIES_EXHAUSTED]


def fill(redis_url: str, dead_letters: int) -> None:
    """Counters, key states and a few queued events for every destination; the dead
    letters in the first."""
    settings = Settings(_env_file=None, redis_url=redis_url)
    client = redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=False)
    for i in range(CONFIGURED):
        keys = settings.keys.for_destination(name(i))
        pipe.hset(keys.stats, mapping={"enqueued": 1000 + i, "delivered": 990 + i})
        held = i % 50 == 7
        state = {"state": "held", "reason": "missing_scope", "guidance": "a diagnosis"}
        pipe.hset(keys.key_state, mapping=state if held else {"state": "ok"})
        if i % 100 == 3:
            pipe.hset(keys.endpoint, mapping={"failing_since": int(time.time() * 1000)})
        for n in range(3):
            pipe.xadd(keys.stream, {"e": b"{}", "t": 0, "i": f"q-{n}"})
        pipe.xgroup_create(keys.stream, CONSUMER_GROUP, id="0")  # as a worker does
        for shard in range(DEDUP_KEYS):  # the dedup records a busy destination keeps
            pipe.set(f"{keys.dedup_prefix}1:{shard}", b"x" * 16)
    pipe.execute()
    client.close()
    now = int(time.time() * 1000)
    seed_dead_letters(
        settings,
        [f"dl-{j}" for j in range(dead_letters)],
        [REASONS[j % len(REASONS)] for j in range(dead_letters)],
        [now - j for j in range(dead_letters)],
        destination=name(0),
    )
    custom = {"type": "custom", "custom_event_name": "quote_requested", "data": {"type": "custom"}}
    seed_dead_letters(  # the oldest, custom: the search reads the newest 10,000 names
        settings, ["custom-1"], [Reason.INVALID_EVENT], [now - dead_letters], name(0), custom
    )


def timed(client: httpx.Client, path: str) -> list[float]:
    """Milliseconds of ROUNDS GETs of ``path`` (after one warm-up)."""
    answer = client.get(path)
    assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
    took = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        answer = client.get(path)
        took.append((time.perf_counter() - started) * 1000)
        assert answer.status_code == 200
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dead-letters", type=int, default=100_000)
    args = parser.parse_args()
    token = auth.new_token()
    with redis_server() as redis_url, tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        fill(redis_url, args.dead_letters)
        print(
            f"filled Redis: {CONFIGURED:,} destinations, {args.dead_letters:,} dead letters "
            f"in {time.perf_counter() - started:.1f} s"
        )
        destinations = Path(tmp) / "destinations.toml"
        write_destinations(destinations, "http://127.0.0.1:9", {})
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
        env.update(
            key_env(),
            CAPI_CONFIG_FILE=os.devnull,
            CAPI_REDIS_URL=redis_url,
            CAPI_DESTINATIONS_FILE=str(destinations),
            CAPI_CONSOLE_TOKENS_SHA256=f"viewer:{auth.digest(token)}",
        )
        log = Path(tmp) / "console.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "console", "--port", "0"],
                env=env,
                stdout=out,
                stderr=out,
            )
        try:
            url = ""
            for _ in range(600):
                found = re.findall(r"capi console on (http://\S+)", log.read_text())
                if found:
                    url = found[0]
                    break
                time.sleep(0.1)
            assert url, log.read_text()
            report(url, token, f"dl-{args.dead_letters * 7 // 9}")
        finally:
            proc.terminate()
            proc.wait(10)


def report(url: str, token: str, event_id: str) -> None:
    """Print the timings of each page (``event_id``: a dead letter's, to search for)."""
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"load average before: {load} ({os.cpu_count()} cores)")
    pages = {
        f"overview ({CONFIGURED:,} destinations)": "/",
        "overview JSON (the live poll)": "/overview.json",
        "dead letters, first page": f"/d/{name(0)}/dead-letters",
        "dead letters, page at 50,000": f"/d/{name(0)}/dead-letters?at=50000",
        "dead letters, reason filter": f"/d/{name(0)}/dead-letters?reason=invalid_event",
        "dead letters, search by id": f"/d/{name(0)}/dead-letters?id={event_id}",
        "search by id, custom event (newest 10k)": f"/d/{name(0)}/dead-letters?id=custom-1",
        "one dead letter": f"/d/{name(0)}/dead-letter?key=order_created%3A{event_id}",
    }
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        print(f"{'page':<40} {'median ms':>10} {'p95 ms':>8}  target {TARGET_MS} ms")
        for label, path in pages.items():
            took = sorted(timed(client, path))
            p95 = took[int(len(took) * 0.95) - 1]
            verdict = "ok" if p95 < TARGET_MS else "OVER"
            print(f"{label:<40} {statistics.median(took):>10.1f} {p95:>8.1f}  {verdict}")
    with open("/proc/loadavg") as f:
        print(f"load average after: {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
