"""Reproductions of two capi bugs the soak found (not fixed here: reported to issue 9).

    python -m tests.benchmarks.repros stuck      # entries stuck in a live worker
    python -m tests.benchmarks.repros keyguard   # a healthy key confirmed broken

stuck: a worker whose XREADGROUP answer is lost (the connection dropped by CLIENT KILL, or
a timeout during a freeze, after Redis handed it the entries) never sends those entries:
it reads only new ones (">") again, renews leases only on what it knows it holds, and no
other worker reclaims them because their holder is alive. They wait until that worker
stops and another takes them over (LIVENESS_S after its heartbeat ends).

keyguard: after a transient 401 missing scope, the key guard probes the key three times;
a dropped response or a 429 on each probe counts as a failed probe, so a healthy key is
"confirmed broken", the batch is dead-lettered as missing_scope and every worker held.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from capi.sandbox import Fault, SandboxThread
from tests.helpers import dead_letters, enqueue, events, make_settings, start_worker, wait_for
from tests.redisproc import RedisProcess


def stuck() -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        RedisProcess(Path(tmp)) as server,
        SandboxThread() as sb,
    ):
        settings = make_settings(sb, server.url, redis_timeout_s=1.0, concurrency=1)
        proc = start_worker(settings)
        c = server.client()
        wait_for(lambda: c.zcard(settings.keys.workers) > 0, 20, "worker up")
        kills = 0
        for i in range(40):  # an enqueue, then every client's connection dropped
            enqueue(settings, events(25, start=i * 25))
            kills += int(c.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))
            time.sleep(0.1)
        time.sleep(15)  # longer than LIVENESS_S + claim_idle: anything reclaimable is taken
        pending = c.xpending_range(settings.keys.stream, "senders", "-", "+", 10_000)
        live = c.zrangebyscore(settings.keys.workers, int(time.time() * 1000) - 5000, "+inf")
        print(
            f"clients killed {kills}; delivered {len(sb.state.delivered_ids())}/1000; "
            f"worker alive {proc.poll() is None}, heartbeating {live}"
        )
        by: dict[str, list[int]] = {}
        for p in pending:
            by.setdefault(p["consumer"].decode(), []).append(p["time_since_delivered"])
        for name, idle in by.items():
            print(f"  pending in {name}: {len(idle)} entries, idle {min(idle)}-{max(idle)} ms")
        time.sleep(10)
        print(f"10 s later: delivered {len(sb.state.delivered_ids())}/1000")
        proc.terminate()
        proc.communicate(timeout=30)


def keyguard(kind: str = "drop") -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        RedisProcess(Path(tmp)) as server,
        SandboxThread() as sb,
    ):
        settings = make_settings(sb, server.url, concurrency=1, batch_size=100)
        proc = start_worker(settings)
        c = server.client()
        wait_for(lambda: c.zcard(settings.keys.workers) > 0, 20, "worker up")
        time.sleep(1.5)  # past the startup probe (a probe within min_probe_interval is trusted)
        sb.state.faults = [
            Fault("missing_scope", every=1, remaining=1),  # one transient 401 on a batch
            Fault(kind, every=1, remaining=3, retry_after_s=0.05),  # type: ignore[arg-type]
        ]
        enqueue(settings, events(100))
        time.sleep(8)
        dls = dead_letters(settings)
        print(
            f"after one 401, {kind} x3 on the probes: delivered "
            f"{len(sb.state.delivered_ids())}/100, dead-lettered {len(dls)} "
            f"{sorted({r['reason'] for r in dls.values()})}"
        )
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        print("\n".join(line[:300] for line in out.splitlines() if "keyguard" in line))


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "stuck"
    if which == "stuck":
        stuck()
    else:
        keyguard(sys.argv[2] if len(sys.argv) > 2 else "drop")
