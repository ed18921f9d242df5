"""Fault campaign for SyncProducer on a Redis Cluster (three masters, a replica each,
``CAPI_ENQUEUE_DURABILITY=replica``), for real.

    python -m tests.benchmarks.cluster_faults

Producer threads, each with its own SyncProducer, enqueue batches of 20 events (a failed
batch is sent again half of the time); every answer is recorded. Faults in turn, on the
master serving the destination's stream: SIGSTOP shorter than the node timeout, SIGSTOP
longer (a failover), kill -9 (a failover), CLIENT KILL; then every node frozen while a
SyncProducer is made (it must raise QueueUnavailable, nothing else). Then a burst worker
drains and every event acknowledged (queued or duplicate) must have been delivered.
Exit 1 if any was lost.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path

from capi.errors import CapiError, QueueUnavailable
from capi.producer import SyncProducer
from capi.sandbox import SandboxThread
from tests.benchmarks.intake_faults import say
from tests.clusterproc import ClusterSet, cluster_settings
from tests.helpers import drain, events


def main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="capi-cluster-faults-") as tmp,
        ClusterSet(Path(tmp), masters=3, replicas_each=1, node_timeout_ms=2000) as cs,
        SandboxThread() as sb,
    ):
        settings = cluster_settings(
            sb,
            cs,
            enqueue_durability="replica",
            redis_timeout_s=2,
            durability_timeout_ms=1000,
            request_timeout_s=3,
            claim_idle_s=5,
        )
        acked: set[str] = set()
        tried: set[str] = set()
        answers: collections.Counter[str] = collections.Counter()
        stop = threading.Event()
        lock = threading.Lock()

        def produce(n: int) -> None:
            rng = random.Random(n)
            producer = None
            i = 0
            while not stop.is_set():
                batch = events(20, start=i, prefix=f"t{n}-")
                i += 20
                for _attempt in range(2):
                    try:
                        if producer is None:
                            producer = SyncProducer.from_settings(settings)
                        report = producer.enqueue_many(batch)
                    except QueueUnavailable:
                        with lock:
                            answers["QueueUnavailable"] += 1
                            tried.update(e["id"] for e in batch)
                        if rng.random() < 0.5:
                            break
                        time.sleep(0.3)
                        continue
                    except CapiError as exc:
                        with lock:
                            answers[type(exc).__name__] += 1
                        break
                    except Exception as exc:  # what a caller would not expect
                        with lock:
                            answers[f"UNEXPECTED {type(exc).__name__}: {exc}"[:200]] += 1
                        producer = None
                        break
                    with lock:
                        answers["ok"] += 1
                        refused = {pos for pos, _ in report.refused}
                        acked.update(e["id"] for k, e in enumerate(batch) if k not in refused)
                    break

        threads = [threading.Thread(target=produce, args=(n,), daemon=True) for n in range(4)]
        for t in threads:
            t.start()
        stream = settings.keys.stream

        def master() -> int:
            return cs.nodes.index(cs.node_of(stream))

        time.sleep(3)
        node = cs.nodes[master()]
        say("fault sigstop 1s (under the node timeout) on", node.address)
        os.kill(node.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        time.sleep(1)
        os.kill(node.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        time.sleep(4)
        node = cs.nodes[master()]
        say("fault client kill on", node.address)
        with node.client() as c:
            for _ in range(3):
                c.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
                time.sleep(0.5)
        time.sleep(4)
        node = cs.nodes[master()]
        say("fault sigstop 8s (a failover) on", node.address)
        os.kill(node.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        time.sleep(8)
        os.kill(node.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        cs.wait_ok(60)
        time.sleep(4)
        node = cs.nodes[master()]
        say("fault kill -9 (a failover) of", node.address)
        node.kill()
        cs.wait_ok(60)
        time.sleep(4)
        stop.set()
        for t in threads:
            t.join(30)
        say("answers", dict(answers))
        live = [n for n in cs.nodes if n.alive()]
        for n in live:
            os.kill(n.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            SyncProducer.from_settings(settings).close()
            made = "made (no error)"
        except QueueUnavailable as exc:
            made = f"QueueUnavailable: {exc}"
        except Exception as exc:
            made = f"UNEXPECTED {type(exc).__name__}: {exc}"
        finally:
            for n in live:
                os.kill(n.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        say("SyncProducer.from_settings with every node frozen:", made[:400])
        cs.wait_ok(60)
        drain(settings, timeout_s=300)
        delivered = sb.state.delivered_ids()
        lost = sorted(acked - set(delivered))
        extra = set(delivered) - tried - acked
        dups = sum(max(0, c - 1) for c in delivered.values())
        print(
            f"acked {len(acked)}, tried-not-acked {len(tried - acked)}, delivered "
            f"{len(set(delivered))}, LOST {len(lost)}, duplicate sends {dups}, "
            f"delivered never tried {len(extra)}"
        )
        for eid in lost[:20]:
            print("  LOST", eid)
    raise SystemExit(1 if lost else 0)


if __name__ == "__main__":
    main()
