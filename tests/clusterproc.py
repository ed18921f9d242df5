"""A Redis Cluster of a test's own: three masters and three replicas
(``redis-server --cluster-enabled yes``, joined by ``redis-cli --cluster create``), all on
loopback free ports, all started through ``tests.helpers.spawn`` so they are stopped
whatever happens."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from capi.sandbox import SandboxThread
from capi.settings import Settings
from tests.conftest import free_port
from tests.helpers import make_settings, spawn, terminate


class Node:
    """One cluster-enabled redis-server."""

    def __init__(self, binary: str, workdir: Path, node_timeout_ms: int) -> None:
        self.binary = binary
        self.workdir = workdir
        self.node_timeout_ms = node_timeout_ms
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *, cluster: bool = True) -> None:
        """Start the server (``cluster=False``: a plain one, for comparisons)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "out.log").open("ab") as log:  # the child keeps its own copy
            self.proc = self._spawn(log, cluster)

    def _spawn(self, log: Any, cluster: bool) -> subprocess.Popen[bytes]:
        return spawn(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes" if cluster else "no",
                "--cluster-config-file",
                str(self.workdir / "nodes.conf"),
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--appendonly",
                "no",
                "--repl-diskless-sync-delay",
                "0",
                "--save",
                "",
                "--dir",
                str(self.workdir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, **kwargs)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def answers(self) -> bool:
        try:
            with self.client() as c:
                return bool(c.ping())
        except (redis.exceptions.RedisError, OSError):
            return False

    def info(self, section: str) -> dict[str, Any]:
        with self.client(decode_responses=True) as c:
            found: dict[str, Any] = c.info(section)
            return found

    def cluster_info(self) -> str:
        with self.client(decode_responses=True) as c:
            return str(c.execute_command("CLUSTER", "INFO"))

    def is_master(self) -> bool:
        try:
            return self.info("replication").get("role") == "master"
        except (redis.exceptions.RedisError, OSError):
            return False

    def kill(self) -> None:
        """kill -9."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


class ClusterSet:
    """``masters`` masters, each with ``replicas_each`` replicas."""

    def __init__(
        self,
        workdir: Path,
        *,
        masters: int = 3,
        replicas_each: int = 1,
        node_timeout_ms: int = 1000,
    ) -> None:
        found = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        assert found and cli, "redis-server and redis-cli are not installed (.ci/run installs them)"
        self.cli = cli
        self.replicas_each = replicas_each
        count = masters * (1 + replicas_each)
        self.nodes = [Node(found, workdir / f"node{i}", node_timeout_ms) for i in range(count)]

    @property
    def url(self) -> str:
        """``CAPI_REDIS_URL``: any one node."""
        return f"redis://{self.nodes[0].address}/0"

    def start(self) -> ClusterSet:
        for node in self.nodes:
            node.start()
        self._wait(self._all_answer, 30, "every node to answer")
        if len(self.nodes) == 1:  # redis-cli creates three masters at least
            with self.nodes[0].client() as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            self.wait_ok()
            return self
        created = subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(n.address for n in self.nodes),
                "--cluster-replicas",
                str(self.replicas_each),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        self.wait_ok()
        return self

    def _all_answer(self) -> bool:
        """Whether every node answers; one that exited at once lost its free port to another
        process (the suite runs in parallel): start it again on another one."""
        for node in self.nodes:
            if not node.alive():
                node.port = free_port()
                node.start()
        return all(n.answers() for n in self.nodes)

    def wait_ok(self, timeout_s: float = 60.0) -> None:
        """Until every live node says cluster_state:ok and knows every slot's master, and
        each master has its replicas in sync."""
        self._wait(self._ok, timeout_s, "cluster_state:ok on every node")

    def _ok(self) -> bool:
        try:
            live = [n for n in self.nodes if n.alive()]
            if not all("cluster_state:ok" in n.cluster_info() for n in live):
                return False
            if any(not n.alive() for n in self.nodes):
                return True  # after a kill: the promoted master has no replica left
            # Each replica in sync: one that never was cannot take over its master.
            masters = [n for n in live if n.is_master()]
            return self.replicas_each == 0 or all(_replicas_online(n) for n in masters)
        except (redis.exceptions.RedisError, OSError):
            return False

    def masters(self) -> list[Node]:
        return [n for n in self.nodes if n.alive() and n.is_master()]

    def node_of(self, key: str) -> Node:
        """The live master that serves ``key``'s slot now."""
        with self.masters()[0].client() as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            port = _owner(c, slot)
        return next(n for n in self.nodes if n.port == port)

    @staticmethod
    def _wait(predicate: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def __enter__(self) -> ClusterSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        for node in self.nodes:
            if node.alive():
                assert node.proc is not None
                terminate(node.proc)


def _replicas_online(master: Node) -> bool:
    info = master.info("replication")
    found = [info.get(f"slave{i}", {}) for i in range(int(info.get("connected_slaves", 0)))]
    return bool(found) and all(isinstance(r, dict) and r.get("state") == "online" for r in found)


def _owner(client: redis.Redis, slot: int) -> int | None:
    for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
        if int(start) <= slot <= int(end):
            return int(master[1])
    return None


def cluster_settings(sandbox: SandboxThread, found: ClusterSet, **overrides: Any) -> Settings:
    """Settings for the sandbox that reach Redis through ``found``'s nodes."""
    return make_settings(sandbox, found.url, **{"redis_cluster": True, **overrides})
