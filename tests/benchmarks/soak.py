"""Soak under faults: kill -9 workers at random, drop Redis connections, inject every fault,
then account for every event.

    python -m tests.benchmarks.soak                      # 50,000 events, ~2 minutes
    python -m tests.benchmarks.soak --events 5000 --kills 3

The sandbox injects intermittent missing-scope 401s and RBAC denials (never twice in a row,
as seen in the wild), random 429s, 5xx, dropped responses after commit, and latency. A few
events are rewritten so the API rejects them. At the end every enqueued event must be
delivered (by id, at the sandbox) or dead-lettered with a true reason, and duplicates are
counted (at-least-once allows them; the API dedups on the id).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import orjson
import redis

from capi.producer import SyncProducer
from capi.sandbox import Fault, SandboxThread
from capi.settings import Settings
from tests.helpers import doom
from tests.helpers import events as make_events


@dataclass
class SoakReport:
    """How the soak went, and whether every event is accounted for."""

    events: int
    delivered: int = 0
    dead_lettered: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    wrongly_dead_lettered: list[str] = field(default_factory=list)
    duplicates: int = 0
    kills: int = 0
    redis_drops: int = 0
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every event delivered or dead-lettered with a true reason."""
        return not self.lost and not self.wrongly_dead_lettered


def _worker(settings: Settings, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPI_")}
    env.update(
        {
            "CAPI_API_KEY": settings.api_key.get_secret_value() if settings.api_key else "",
            "CAPI_PIXEL_ID": settings.pixel_id or "",
            "CAPI_BASE_URL": settings.base_url,
            "CAPI_REDIS_URL": settings.redis_url,
            "CAPI_CONFIG_FILE": os.devnull,
            "CAPI_BATCH_SIZE": str(settings.batch_size),
            "CAPI_MAX_ATTEMPTS": str(settings.max_attempts),
            "CAPI_RETRY_BASE_S": str(settings.retry_base_s),
            "CAPI_RETRY_CAP_S": str(settings.retry_cap_s),
            "CAPI_CLAIM_IDLE_S": str(settings.claim_idle_s),
            "CAPI_REPROBE_INTERVAL_S": str(settings.reprobe_interval_s),
            "CAPI_REQUEST_TIMEOUT_S": str(settings.request_timeout_s),
        }
    )
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "worker", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def default_faults() -> list[Fault]:
    """Key blips never twice in a row (as seen in the wild); the rest at random."""
    return [
        Fault("missing_scope", every=23),
        Fault("rbac", every=29),
        Fault("rate_limit", rate=0.03, retry_after_s=0.05),
        Fault("server_error", rate=0.03, status=503),
        Fault("drop", rate=0.03),
        Fault("latency", rate=0.5, latency_ms=100),
    ]


def soak(
    sandbox: SandboxThread,
    settings: Settings,
    *,
    n_events: int,
    workers: int = 2,
    kills: int = 4,
    doomed: int = 5,
    seed: int = 7,
    timeout_s: float = 300,
    faults: list[Fault] | None = None,
) -> SoakReport:
    """Run the soak against a sandbox and a Redis; return the accounting."""
    rng = random.Random(seed)
    started = time.monotonic()
    evts = make_events(n_events, prefix="soak-")
    waves = [evts[i :: kills + 1] for i in range(kills + 1)]  # one wave before each kill
    producer = SyncProducer.from_settings(settings)
    assert producer.enqueue_many(waves[0]).ok
    stream_len = redis.Redis.from_url(settings.redis_url).xlen(settings.keys.stream)
    bad_ids = set(doom(settings, positions=rng.sample(range(stream_len), doomed)))
    sandbox.state.rng = random.Random(seed)
    sandbox.state.faults = faults or default_faults()
    report = SoakReport(events=n_events)
    procs = [_worker(settings) for _ in range(workers)]
    admin = redis.Redis.from_url(settings.redis_url)
    deadline = time.monotonic() + timeout_s
    drop_at = kills // 2
    for i in range(kills):
        time.sleep(rng.uniform(0.2, 1.0))
        assert producer.enqueue_many(waves[i + 1]).ok  # load keeps arriving
        victim = rng.randrange(len(procs))
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        report.kills += 1
        if i == drop_at:
            admin.execute_command("CLIENT", "KILL", "TYPE", "normal")  # drops every client
            report.redis_drops += 1
            admin = redis.Redis.from_url(settings.redis_url)
        procs[victim] = _worker(settings)
    producer.close()
    sandbox.state.faults = sandbox.state.faults[:2]  # the outage ends; key blips go on
    finisher = _worker(settings, "--burst")
    finisher.wait(max(1.0, deadline - time.monotonic()))
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(30)
    _account(report, sandbox, settings, {e["id"] for e in evts}, bad_ids)
    report.seconds = round(time.monotonic() - started, 1)
    return report


def _account(
    report: SoakReport,
    sandbox: SandboxThread,
    settings: Settings,
    all_ids: set[str],
    bad_ids: set[str],
) -> None:
    delivered = sandbox.state.delivered_ids()
    client = redis.Redis.from_url(settings.redis_url)
    records = [orjson.loads(v) for v in client.hgetall(settings.keys.deadletters).values()]
    dls = {r["id"]: r for r in records}  # the soak's event ids are unique across names
    report.delivered = len(set(delivered) & all_ids)
    report.dead_lettered = len(dls)
    for record in dls.values():
        report.dead_letter_reasons[record["reason"]] = (
            report.dead_letter_reasons.get(record["reason"], 0) + 1
        )
    report.lost = sorted(all_ids - set(delivered) - set(dls))
    report.wrongly_dead_lettered = sorted(
        i for i, r in dls.items() if not (i in bad_ids and r["reason"] == "invalid_event")
    )
    report.duplicates = sum(delivered.values()) - len(delivered)
    summary = sandbox.state.summary()
    report.requests = summary["requests"]
    report.statuses = summary["statuses"]


def main() -> None:
    from tests.conftest import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kills", type=int, default=8)
    args = parser.parse_args()
    port = free_port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    try:
        with SandboxThread() as sandbox:
            settings = Settings(
                _env_file=None,
                api_key=next(iter(sandbox.state.conversion_keys)),
                pixel_id=next(iter(sandbox.state.pixels)),
                base_url=sandbox.url,
                redis_url=f"redis://127.0.0.1:{port}/0",
                batch_size=200,
                max_attempts=30,
                retry_base_s=0.05,
                retry_cap_s=1.0,
                claim_idle_s=2.0,
                reprobe_interval_s=0.5,
                request_timeout_s=1.5,
            )
            report = soak(
                sandbox, settings, n_events=args.events, workers=args.workers, kills=args.kills
            )
    finally:
        redis_proc.terminate()
    print(json.dumps({**asdict(report), "ok": report.ok, "lost": len(report.lost)}, indent=2))
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
