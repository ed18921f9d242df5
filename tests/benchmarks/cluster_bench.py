"""The benchmark's cluster row: capi on a Redis Cluster of three masters.

    python -m tests.benchmarks.bench --only cluster

A cluster of its own (three masters, no replicas: replication is not what is measured),
then the same workload on one Redis (``single``, for comparison in the same run),
a sandbox process, and ``destinations`` destinations (300 by default: enough for their
spread over the shards to be near even). Events are enqueued round the destinations
beforehand; then ``workers`` burst ``capi worker`` processes drain them. Printed: events/s
(from the sandbox's first accepted batch to its last), each master's Redis CPU per event
it served (``INFO cpu`` deltas over the drain, divided by the events of the destinations
on that master), and the destinations per master with their spread from even.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from capi.producer import SyncProducer
from capi.settings import Settings
from tests.benchmarks.bench import drain_rate, run_workers, sample_events, sandbox_call
from tests.clusterproc import ClusterSet, Node
from tests.conftest import free_port
from tests.helpers import stop_spawned


def cluster_row(n: int, destinations: int = 300, workers: int = 1) -> dict[str, Any]:
    """Drain ``n`` events over ``destinations`` destinations on a 3-master cluster, and the
    same on one Redis (``single``), in one run."""
    row = _drain(n, destinations, workers, cluster=True)
    row["single"] = _drain(n, destinations, workers, cluster=False)
    return row


def _drain(n: int, destinations: int, workers: int, *, cluster: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        nodes = ClusterSet(Path(tmp) / "cluster", masters=3 if cluster else 1, replicas_each=0)
        if cluster:
            nodes.start()
        else:
            nodes.nodes[0].start(cluster=False)
            nodes._wait(nodes.nodes[0].answers, 20, "redis-server to start")
        sandbox, base = _sandbox()
        try:
            env = _configure(Path(tmp), nodes, base, destinations, cluster=cluster)
            os.environ.update({k: v for k, v in env.items() if k.startswith("CAPI_KEY_C")})
            settings = Settings.load(os.devnull, **_settings_values(env, cluster=cluster))
            names = [f"c{i}" for i in range(destinations)]
            n = n // destinations * destinations  # the same count for each destination
            _enqueue(settings, names, n)
            masters = {node.port: node for node in nodes.masters()} if cluster else {}
            masters = masters or {nodes.nodes[0].port: nodes.nodes[0]}
            on = {port: 0 for port in masters}
            for name in names:
                keys = settings.keys.for_destination(name)
                on[nodes.node_of(keys.stream).port if cluster else nodes.nodes[0].port] += 1
            cpu0 = {port: _cpu(node) for port, node in masters.items()}
            run_workers(env, workers, {"CAPI_BATCH_SIZE": "500", "CAPI_BATCH_WAIT_MS": "20"})
            cpu = {port: _cpu(node) - cpu0[port] for port, node in masters.items()}
            state = sandbox_call(env, "/_sandbox/state")
            assert state["accepted_unique"] == n, state
            rate = drain_rate(env)
        finally:
            sandbox.terminate()
            sandbox.wait(10)
            stop_spawned()
    even = destinations / len(masters)
    return {
        "events": n,
        "destinations": destinations,
        "workers": workers,
        "events_per_s": round(rate),
        "shards": [
            {
                "master": port,
                "destinations": on[port],
                "spread_pct": round((on[port] - even) / even * 100, 1),
                "redis_cpu_us_per_event": round(cpu[port] / (n * on[port] / destinations) * 1e6, 1)
                if on[port]
                else None,
            }
            for port in sorted(masters)
        ],
    }


def print_cluster(x: dict[str, Any]) -> None:
    """The cluster row as the benchmark's table prints it."""
    print(
        f"Redis Cluster, 3 masters: {x['events']:,} events over {x['destinations']} "
        f"destinations, {x['workers']} worker(s), batch 500: {x['events_per_s']:,} events/s"
    )
    for s in x["shards"]:
        print(
            f"  master :{s['master']}: {s['destinations']} destinations ({s['spread_pct']:+}% "
            f"of even), Redis {s['redis_cpu_us_per_event']} us per event it served"
        )
    one = x["single"]
    print(
        f"  the same on one Redis, same run: {one['events_per_s']:,} events/s, Redis "
        f"{one['shards'][0]['redis_cpu_us_per_event']} us per event"
    )


def _sandbox() -> tuple[subprocess.Popen[bytes], str]:
    """A sandbox process, and its base URL."""
    base = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "sandbox", "--port", base.rsplit(":", 1)[1]],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1):
                return proc, base
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the sandbox did not start")


def _configure(
    tmp: Path, nodes: ClusterSet, base: str, count: int, *, cluster: bool
) -> dict[str, str]:
    """A destinations file of ``count`` destinations, their keys in the returned env (with
    the cluster and the sandbox), and the sandbox told their keys and pixels."""
    lines, env = [], {}
    for i in range(count):
        env[f"CAPI_KEY_C{i}"] = f"sk-conv-cluster-{i:04d}"
        lines += [
            f"[destinations.c{i}]",
            f'pixel_id = "pix-c{i}"',
            f'api_key_env = "CAPI_KEY_C{i}"',
        ]
        lines += [f'base_url = "{base}"', ""]
    path = tmp / "destinations.toml"
    path.write_text("\n".join(lines))
    keys = [v for k, v in env.items() if k.startswith("CAPI_KEY_C")]
    config = {"conversion_keys": keys, "pixels": [f"pix-c{i}" for i in range(count)]}
    sandbox_call({"CAPI_BASE_URL": base}, "/_sandbox/config", _json(config))
    return {
        **env,
        "CAPI_REDIS_URL": nodes.url,
        "CAPI_REDIS_CLUSTER": "true" if cluster else "false",
        "CAPI_DESTINATIONS_FILE": str(path),
        "CAPI_BASE_URL": base,
        "CAPI_CONFIG_FILE": os.devnull,
    }


def _settings_values(env: dict[str, str], *, cluster: bool) -> dict[str, Any]:
    return {
        "redis_url": env["CAPI_REDIS_URL"],
        "redis_cluster": cluster,
        "destinations_file": env["CAPI_DESTINATIONS_FILE"],
        "base_url": env["CAPI_BASE_URL"],
    }


def _enqueue(settings: Settings, names: list[str], n: int) -> None:
    per = n // len(names)
    with SyncProducer.from_settings(settings) as producer:
        for name in names:
            report = producer.enqueue_many(sample_events(per, name), destination=name)
            assert report.queued == per, report


def _cpu(node: Node) -> float:
    info = node.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _json(value: Any) -> bytes:
    return orjson.dumps(value)
